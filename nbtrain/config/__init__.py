"""Pure configuration: flags → TrainConfig → checked plan → DeepSpeed dict (nothing heavy at import).

In the order a run flows: `arguments` (the `%%bigtrain` line) → `tree` (TrainConfig) →
`render` (the DeepSpeed dict) → `validate` + `deepspeed_rules` + `schema` (every problem at
once) → `plan` (with `machine`, `hosts`, `estimate`). `schedules` previews the learning rate.
"""
