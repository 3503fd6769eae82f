"""Token tagging (NER): word-piece label alignment and an encoder with a softmax or CRF head.

Labels live on words; the encoder sees sub-tokens. The first sub-token of each word carries the word's label
(the BERT paper's convention); the other sub-tokens get no label. The model gathers the first sub-token of each
word, so both heads score one position per word and the CRF's transitions are between words, not word pieces.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from launcher.tasks.crf import CRF, bio_constraints
from launcher.tasks.spans import check_bio, repair_bio, split_bio  # noqa: F401  (their 0.1 home)

IGNORE = -100
"""The label of positions no loss is taken on (torch's cross-entropy default)."""


def first_subtokens(word_ids: list[int | None]) -> tuple[list[int], list[int]]:
    """(positions, words): the token position of each word's first sub-token and that word's number, in order.

    A word the tokenizer turned into no token at all (or one cut off by truncation) is absent from both."""
    positions, words, previous = [], [], None
    for position, word in enumerate(word_ids):
        if word is not None and word != previous:
            positions.append(position)
            words.append(word)
        previous = word
    return positions, words


@dataclass
class TaggerOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    """Per-word emission scores [batch, words, labels]."""
    pred: torch.Tensor | None = None
    """Per-word predicted label ids [batch, words], -1 past each sentence's end (eval mode only)."""


class TokenTagger(PreTrainedModel):
    """An encoder, dropout, a linear emission layer and, for head="crf", our CRF with BIO constraints.

    A PreTrainedModel so peft, activation checkpointing and save_pretrained treat it like any HF model. All
    parameters are used inside `forward` (the CRF runs through its own forward), which ZeRO-3 and FSDP need."""

    config_class = PreTrainedConfig
    base_model_prefix = "encoder"
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    def __init__(self, config: PreTrainedConfig, encoder: nn.Module, head: str = "softmax"):
        super().__init__(config)
        labels = [config.id2label[i] for i in range(config.num_labels)]
        self.encoder = encoder
        p = getattr(config, "classifier_dropout", None)
        self.dropout = nn.Dropout(p if p is not None else getattr(config, "hidden_dropout_prob", 0.1))
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.crf = CRF(config.num_labels, *bio_constraints(labels)) if head == "crf" else None
        self._no_split_modules = list(getattr(encoder, "_no_split_modules", None) or [])
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # Only the new head is initialised here: the encoder arrives with its pretrained (or seeded) weights.
        if module is self.classifier:
            nn.init.normal_(module.weight, std=getattr(self.config, "initializer_range", 0.02))
            nn.init.zeros_(module.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        word_pos: torch.Tensor,
        word_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        **unused,
    ) -> TaggerOutput:
        extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra)[0]
        scores = self.classifier(self.dropout(hidden))
        emissions = scores.gather(1, word_pos.unsqueeze(-1).expand(-1, -1, scores.shape[-1]))
        mask = word_mask.bool()
        loss = pred = None
        if labels is not None:
            if self.crf is not None:
                loss = self.crf(emissions, mask, labels)
            else:
                loss = nn.functional.cross_entropy(emissions[mask].float(), labels[mask])
        if not self.training:
            if self.crf is not None:
                pred = self.crf(emissions, mask)
            else:
                pred = emissions.argmax(-1).masked_fill(~mask, -1)
        return TaggerOutput(loss=loss, logits=emissions, pred=pred)

    def as_transformers(self) -> tuple[PreTrainedModel, dict[str, dict[str, torch.Tensor]]]:
        """This tagger as the transformers token classifier of its encoder (`BertForTokenClassification`, ...),
        sharing its tensors, and the files that go beside it: for head="crf", crf.safetensors with the scores a
        decoder uses (transitions [from, to], start, end; moves BIO forbids already at -1e4). The classifier's
        per-token logits, taken at each word's first sub-token, are this tagger's emissions (docs/export.md)."""
        from transformers import AutoModelForTokenClassification

        with torch.device("meta"):
            hf = AutoModelForTokenClassification.from_config(self.config)
        state = {f"{hf.base_model_prefix}.{k}": v for k, v in self.encoder.state_dict().items()}
        state.update({f"classifier.{k}": v for k, v in self.classifier.state_dict().items()})
        missing, unexpected = hf.load_state_dict(state, strict=False, assign=True)
        if missing or unexpected:
            raise ValueError(
                f"{type(hf).__name__} does not hold this tagger's tensors (missing {missing[:3]}, unexpected "
                f"{unexpected[:3]})"
            )
        extra = {}
        if self.crf is not None:
            with torch.no_grad():
                extra["crf.safetensors"] = {
                    "transitions": (self.crf.transitions + self.crf.trans_penalty).float().contiguous(),
                    "start": (self.crf.start + self.crf.start_penalty).float().contiguous(),
                    "end": self.crf.end.float().contiguous(),
                }
        return hf, extra
