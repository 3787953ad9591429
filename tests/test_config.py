"""Config loading: strict keys, typed overrides, clear errors."""

import pytest

from lockedopd.opd.config import OPDConfig, load_config
from tests.conftest import REPO, TINY_CONFIG


def test_tiny_config_loads_with_overrides():
    cfg = load_config(TINY_CONFIG, ["max_steps=3", "lock.rank=2", "objective.name=pg", "lr=0.5", "resume=true"])
    assert isinstance(cfg, OPDConfig)
    assert (cfg.max_steps, cfg.lock.rank, cfg.objective.name, cfg.lr, cfg.resume) == (3, 2, "pg", 0.5, True)
    assert cfg.teacher.model.num_layers == 4


def test_all_shipped_configs_load():
    configs = sorted((REPO / "recipes" / "configs").glob("*.yaml"))
    assert len(configs) >= 2
    for path in configs:
        first_line = path.read_text().splitlines()[0]
        commands = ("distill", "build-model")  # the command that runs it, with its own path
        assert any(first_line.startswith(f"# lockedopd {c} recipes/configs/{path.name}") for c in commands), path
        load_config(path)


@pytest.mark.parametrize(
    "override, message",
    [
        ("max_step=3", "unknown key 'max_step'"),
        ("lock.rnak=3", "unknown key 'lock.rnak'"),
        ("objective.name=sfft", "objective.name='sfft' is not one of"),
        ("batch_size=0", "batch_size must be >= 1"),
        ("max_steps=ten", "max_steps must be int"),
        ("objective.reward_lambda=0.5", "set objective.reward_fn"),
        ("teacher.backend=openai", "teacher.backend='openai'"),
        ("lock.at_step=0", "lock.at_step must be >= 1 or null, got 0"),
        ("lock.max_warmup_steps=0", "lock.max_warmup_steps must be >= 1 or null"),
        ("lock.threshold=1.5", "lock.threshold must be in (0, 1], got 1.5"),
        ("lock.mode=left", "lock.mode='left' is not one of ['right', 'two_sided']"),
    ],
)
def test_bad_config_values_name_the_key(override, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(TINY_CONFIG, [override])


def test_missing_config_file_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_override_syntax_error():
    with pytest.raises(ValueError, match="key=value"):
        load_config(TINY_CONFIG, ["max_steps"])


def _choice_fields(section, prefix=""):
    """(dotted key, allowed values) of every setting that declares its allowed values."""
    import dataclasses

    from lockedopd.opd.config import allowed_values

    found = []
    for spec in dataclasses.fields(section):
        value = getattr(section, spec.name)
        if dataclasses.is_dataclass(value):
            found += _choice_fields(value, f"{prefix}{spec.name}.")
        elif allowed_values(spec) is not None:
            found.append((f"{prefix}{spec.name}", allowed_values(spec)))
    return found


def test_every_declared_choice_is_checked_and_its_default_allowed():
    config = load_config(TINY_CONFIG)
    fields = dict(_choice_fields(config))
    # the choices live with their fields: the ones a user sets most often are among them
    for key in (
        "optimizer",
        "lr_scheduler",
        "lock.mode",
        "lock.optimizer",
        "objective.name",
        "teacher.backend",
        "rollout.backend",
        "monitor.on_drift",
        "student.dtype",
        "teacher.model.dtype",
        "galore.proj_type",
    ):
        assert key in fields, key
    assert set(fields["lock.optimizer"]) == {"coefficients", "factored", "projected_full"}
    assert "sft" in fields["objective.name"] and "hf" in fields["teacher.backend"]  # registries, read when checked
    for key, allowed in fields.items():
        with pytest.raises(ValueError, match=rf"{key}='not-a-choice' is not one of") as refused:
            load_config(TINY_CONFIG, [f"{key}=not-a-choice"])
        assert str(list(allowed)) in str(refused.value)  # the message lists what is allowed
    OPDConfig()  # every default is among its choices (construction validates)


def test_a_sections_own_checks_run_when_the_config_is_built():
    from lockedopd.opd.config import LockConfig, MonitorConfig

    with pytest.raises(ValueError, match="lock.threshold must be in"):
        LockConfig(threshold=1.5).validate()
    with pytest.raises(ValueError, match="monitor.capture_threshold"):
        MonitorConfig(capture_threshold=2.0).validate()
    with pytest.raises(ValueError, match="lock.lr_scale"):
        load_config(TINY_CONFIG, ["lock.lr_scale=-1"])
