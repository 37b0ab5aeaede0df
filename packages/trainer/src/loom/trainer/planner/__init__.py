"""What a run needs, before it starts: the model's size and the hardware it runs on.

- ``size``: exact parameter counts from a model's config (total, active for a mixture of
  experts, the vision tower apart), an estimate from a name or path where there is no
  config, and the size category (small / medium / large / xlarge).
- ``hardware``: named device profiles (memory, bf16 peak, interconnect), detection of the
  running device, and a user's profile from the config.
"""
