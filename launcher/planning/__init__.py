"""The planner: what a run will hold, need and take, before any process starts.

counting (a model's parameters from its config.json) -> sizing (one rank's model state per strategy) -> rows (the
candidate strategies of `launcher plan`: state, gathered blocks, activations, step temporaries, what fits) ->
timing (FLOPs and seconds) -> auto_choice (strategy=auto) and view (`launcher plan`'s table); probe measures one
row for real (`launcher plan --verify`, the ranks in worker/probe). Pure, except probe (it starts processes).
"""
