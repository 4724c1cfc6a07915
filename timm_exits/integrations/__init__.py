"""Thin adapters for training frameworks. ``timm_exits.integrations.mmengine`` registers the
mmengine model, metric, hooks and optimizer wrapper (imported on demand: mmengine is optional at
run time for users of the plain-PyTorch API)."""
