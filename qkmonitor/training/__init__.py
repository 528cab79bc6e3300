"""qkmonitor during training: the Trainer callback and what it composes.

- ``live``: a live (PEFT-, DDP-, FSDP-, ZeRO-3-wrapped) model's attention layers and full weights;
- ``capture``: attention entropy from the model's real forward passes;
- ``regularizer``: lambda * grad R injected into the attention modules' backward;
- ``alerts``, ``rank_collapse``: collapse rules and the rank-collapse measure;
- ``callback``: ``QKMonitorCallback``, the thin Trainer front end;
- ``lightning``: ``QKMonitorLightningCallback``, the same for a Lightning ``Trainer``.
"""
