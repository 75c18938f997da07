"""d2v's typed configuration: sections, presets, overrides and the DeepSpeed JSON filler."""
from d2v.config.deepspeed_json import DeepSpeedConfigError, fill_ds_config, load_template
from d2v.config.overrides import apply_overrides, from_dict, load_yaml, set_value, to_dict
from d2v.config.presets import base_config, directory_config, find_directory_config, get_preset, list_presets
from d2v.config.schema import (
    AudioFeatureConfig,
    D2vConfig,
    DataConfig,
    LossConfig,
    MaskingConfig,
    ModelConfig,
    OptimConfig,
    TeacherConfig,
    TrainConfig,
)


def resolve(preset: str, config_file: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> D2vConfig:
    """Preset (a name, or an export / import directory whose method continues), then a YAML of
    differences, then key=value overrides; validated."""
    cfg = base_config(preset)
    if config_file:
        load_yaml(cfg, config_file)
    apply_overrides(cfg, overrides)
    return cfg.validate()


__all__ = [
    "AudioFeatureConfig", "D2vConfig", "DataConfig", "LossConfig", "MaskingConfig", "ModelConfig",
    "OptimConfig", "TeacherConfig", "TrainConfig", "DeepSpeedConfigError", "apply_overrides", "fill_ds_config",
    "base_config", "directory_config", "find_directory_config", "from_dict", "get_preset", "list_presets",
    "load_template", "load_yaml", "resolve", "set_value", "to_dict",
]
