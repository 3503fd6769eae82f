"""Linear-chain CRF head for token tagging (NER), with optional BIO transition constraints.

Everything that touches a parameter happens inside `forward`: under DeepSpeed ZeRO-3 / FSDP the parameters are only
gathered for the duration of a module's forward call, so a separate `decode()` method would see empty shards.
"""

from __future__ import annotations

import torch
from torch import nn

from launcher.tasks.spans import split_bio

# Score added to disallowed moves. Large and finite rather than -inf: -inf turns into NaN as soon as two of them meet in
# a subtraction (logsumexp over an all-disallowed column, gradients), while -1e4 simply makes those paths vanish.
DISALLOWED_SCORE = -1e4


def bio_constraints(labels: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Allowed moves for BIO/IOB2 tags: `(allowed_transitions [C, C] (from, to), allowed_start [C])`.

    `I-X` may only follow `B-X` or `I-X`, and no sequence starts with `I-X`; everything else is allowed.
    """
    parsed = [split_bio(label) for label in labels]
    n = len(labels)
    allowed = torch.ones(n, n, dtype=torch.bool)
    allowed_start = torch.ones(n, dtype=torch.bool)
    for j, (prefix_to, kind_to) in enumerate(parsed):
        if prefix_to != "I":
            continue
        allowed_start[j] = False
        for i, (prefix_from, kind_from) in enumerate(parsed):
            allowed[i, j] = prefix_from in ("B", "I") and kind_from == kind_to
    return allowed, allowed_start


class CRF(nn.Module):
    """Linear-chain CRF over per-token emission scores.

    `forward(emissions, mask, tags)` returns the batch-mean negative log-likelihood; `forward(emissions, mask)` returns
    the Viterbi paths. Masks must be left-aligned (a True prefix per row, at least one True per row).
    """

    def __init__(
        self,
        num_tags: int,
        allowed_transitions: torch.Tensor | None = None,
        allowed_start: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if num_tags < 1:
            raise ValueError(f"num_tags must be >= 1, got {num_tags}")
        self.num_tags = num_tags
        # Zeros, not random: the head starts as a plain per-token softmax and runs are reproducible.
        self.transitions = nn.Parameter(torch.zeros(num_tags, num_tags))
        self.start = nn.Parameter(torch.zeros(num_tags))
        self.end = nn.Parameter(torch.zeros(num_tags))

        trans_penalty = torch.zeros(num_tags, num_tags)
        start_penalty = torch.zeros(num_tags)
        if allowed_transitions is not None:
            if tuple(allowed_transitions.shape) != (num_tags, num_tags):
                shape = tuple(allowed_transitions.shape)
                raise ValueError(f"allowed_transitions has shape {shape}, expected ({num_tags}, {num_tags})")
            trans_penalty.masked_fill_(~allowed_transitions.bool().cpu(), DISALLOWED_SCORE)
        if allowed_start is not None:
            if tuple(allowed_start.shape) != (num_tags,):
                raise ValueError(f"allowed_start has shape {tuple(allowed_start.shape)}, expected ({num_tags},)")
            start_penalty.masked_fill_(~allowed_start.bool().cpu(), DISALLOWED_SCORE)
        # Non-persistent: the constraints come from the label list, so they are rebuilt on load and never clash with
        # (or bloat) checkpoints; buffers still follow the module across devices.
        self.register_buffer("trans_penalty", trans_penalty, persistent=False)
        self.register_buffer("start_penalty", start_penalty, persistent=False)

    def forward(self, emissions: torch.Tensor, mask: torch.Tensor, tags: torch.Tensor | None = None) -> torch.Tensor:
        """NLL (mean over the batch) when `tags` is given, otherwise Viterbi paths [B, W] with -1 where masked."""
        if emissions.dim() != 3 or emissions.size(-1) != self.num_tags:
            raise ValueError(f"emissions must be [B, W, {self.num_tags}], got {tuple(emissions.shape)}")
        if tuple(mask.shape) != tuple(emissions.shape[:2]):
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match emissions {tuple(emissions.shape[:2])}")
        # float32 math regardless of the model's dtype: bf16 logsumexp over long sequences loses the loss' precision.
        emissions = emissions.float()
        mask = mask.bool()
        transitions = self.transitions.float() + self.trans_penalty.float()
        start = self.start.float() + self.start_penalty.float()
        end = self.end.float()
        if tags is None:
            return self._viterbi(emissions, mask, transitions, start, end)
        if tuple(tags.shape) != tuple(mask.shape):
            raise ValueError(f"tags shape {tuple(tags.shape)} does not match mask {tuple(mask.shape)}")
        nll = self._log_partition(emissions, mask, transitions, start, end) - self._path_score(
            emissions, mask, tags, transitions, start, end
        )
        return nll.mean()

    @staticmethod
    def _log_partition(
        emissions: torch.Tensor, mask: torch.Tensor, transitions: torch.Tensor, start: torch.Tensor, end: torch.Tensor
    ) -> torch.Tensor:
        """log Z per sequence [B] by the forward algorithm."""
        alpha = start + emissions[:, 0]  # [B, C]
        for t in range(1, emissions.size(1)):
            # [B, from, 1] + [from, to] -> logsumexp over `from`.
            step = torch.logsumexp(alpha.unsqueeze(2) + transitions, dim=1) + emissions[:, t]
            # Finished rows keep their alpha, so the end scores below apply at each row's own last token.
            alpha = torch.where(mask[:, t].unsqueeze(1), step, alpha)
        return torch.logsumexp(alpha + end, dim=1)

    @staticmethod
    def _path_score(
        emissions: torch.Tensor,
        mask: torch.Tensor,
        tags: torch.Tensor,
        transitions: torch.Tensor,
        start: torch.Tensor,
        end: torch.Tensor,
    ) -> torch.Tensor:
        """Score of the gold path per sequence [B]."""
        # Padding positions may hold -100 or anything else: replace them before they are used as indices.
        tags = torch.where(mask, tags.long(), torch.zeros_like(tags, dtype=torch.long))
        maskf = mask.to(emissions.dtype)
        emit = emissions.gather(2, tags.unsqueeze(2)).squeeze(2)  # [B, W]
        score = start[tags[:, 0]] + (emit * maskf).sum(1)
        if tags.size(1) > 1:
            # A move into position t counts only if t is real (left-aligned mask, so t-1 is real too).
            score = score + (transitions[tags[:, :-1], tags[:, 1:]] * maskf[:, 1:]).sum(1)
        last = (mask.long().sum(1) - 1).clamp(min=0)
        last_tags = tags.gather(1, last.unsqueeze(1)).squeeze(1)
        return score + end[last_tags]

    @staticmethod
    def _viterbi(
        emissions: torch.Tensor, mask: torch.Tensor, transitions: torch.Tensor, start: torch.Tensor, end: torch.Tensor
    ) -> torch.Tensor:
        """Best path per sequence [B, W] (long), -1 at masked positions."""
        score = start + emissions[:, 0]  # [B, C]
        backpointers = []
        for t in range(1, emissions.size(1)):
            best, best_from = (score.unsqueeze(2) + transitions).max(dim=1)  # over `from`
            score = torch.where(mask[:, t].unsqueeze(1), best + emissions[:, t], score)
            backpointers.append(best_from)  # [B, C]: best previous tag for each tag at t
        lengths = mask.long().sum(1)
        current = (score + end).argmax(dim=1)  # tag at each row's last real position
        paths = torch.full(mask.shape, -1, dtype=torch.long, device=emissions.device)
        for t in range(emissions.size(1) - 1, -1, -1):
            active = t < lengths
            paths[:, t] = torch.where(active, current, paths[:, t])
            if t > 0:
                previous = backpointers[t - 1].gather(1, current.unsqueeze(1)).squeeze(1)
                # Rows that have not reached their last position yet keep carrying their final tag.
                current = torch.where(active, previous, current)
        return paths
