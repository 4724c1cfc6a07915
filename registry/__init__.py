"""The model catalogue's YAML files (read by :mod:`timm_exits.catalogue`), installed as ``timm_exits.registry``."""
