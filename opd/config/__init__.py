"""The run's configuration: one structured schema holding every default.

YAML files in `conf/` only override it, and `key=value` arguments override those. Each section checks itself
when it is built, `OPDConfig` checks the rules across sections, and loading checks the paths, so a bad key, type
or path is reported in well under a second, before Ray, torch or vLLM are imported: the valid names (loss types,
combine rules, buffer orders, built-ins) are read from the light modules that own them.

    base.py      ConfigError and the checks every section uses
    models.py    engines, student, teachers, combine, judge, correction, data
    training.py  rollout, learner, loss, buffer, eval, pipeline, checkpoint, faults, wandb, ray
    schema.py    OPDConfig and the rules across sections
    load.py      load_config (schema <- YAML <- overrides), the path checks, to_dict
    aliases.py   TRL's and verl's names for opd's keys: the docs' table and the "did you mean" of an unknown key
    reference.py docs/config.md, every key with its type, default and docstring: `python -m opd.config.reference`
"""

from opd.config.base import ConfigError
from opd.config.load import CONF_DIR, load_config, to_dict
from opd.config.models import COMBINE_RULES, DataConfig, EngineConfig, TeacherConfig
from opd.config.schema import OPDConfig
from opd.config.training import FaultConfig, LossConfig

__all__ = [
    "COMBINE_RULES",
    "CONF_DIR",
    "ConfigError",
    "DataConfig",
    "EngineConfig",
    "FaultConfig",
    "LossConfig",
    "OPDConfig",
    "TeacherConfig",
    "load_config",
    "to_dict",
]
