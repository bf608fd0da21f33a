"""Configuration: presets load, --set parses by type, every problem lands in one exact error."""

from __future__ import annotations

import dataclasses
import random
import re
import types
import typing
from datetime import datetime
from pathlib import Path

import pytest

from tinyr1.cli import main
from tinyr1.config import SECTIONS, Config
from tinyr1.config_io import (
    PRESETS_DIR,
    apply_overrides,
    config_to_dict,
    list_presets,
    load_config,
    resolve_output_dir,
    save_config,
)
from tinyr1.config_validate import check_trainable, parse_text
from tinyr1.errors import ConfigError

PRESET_FILES = sorted(PRESETS_DIR.glob("*.toml"))


@pytest.mark.parametrize("path", PRESET_FILES, ids=lambda p: p.stem)
def test_every_preset_loads_and_validates(path: Path) -> None:
    cfg = load_config(path.stem)
    assert cfg.preset == path.stem
    assert cfg.description, "each preset needs a description for `presets list`"
    assert load_config(str(path)) == cfg  # by path too


def test_list_presets_names_every_file_once_tiny_first_then_by_card_size() -> None:
    names = [n for n, _ in list_presets()]
    assert sorted(names) == sorted(p.stem for p in PRESET_FILES)
    if "tiny" in names:
        assert names[0] == "tiny"
    sizes = [int(m.group(1)) for n in names if (m := re.fullmatch(r"(\d+)gb", n))]
    assert sizes == sorted(sizes)
    card_positions = [i for i, n in enumerate(names) if re.fullmatch(r"\d+gb", n)]
    other_positions = [i for i, n in enumerate(names) if n != "tiny" and not re.fullmatch(r"\d+gb", n)]
    assert all(c < o for c in card_positions for o in other_positions)


def test_paper_preset_matches_the_recipe() -> None:
    c = load_config("paper")
    assert (c.grpo.beta, c.grpo.noise_std, c.grpo.kl_clamp, c.grpo.num_iterations) == (0.01, 0.02, 100.0, 1)
    assert (c.train.lr, c.train.lr_scheduler, c.train.warmup_ratio, c.train.max_grad_norm) == (
        1e-6,
        "cosine",
        0.03,
        1.0,
    )
    assert (c.rollout.prompts_per_step, c.rollout.num_generations, c.rollout.max_new_tokens) == (8, 8, 512)
    assert (c.rollout.temperature, c.rollout.top_k, c.rollout.top_p) == (1.0, 50, 1.0)
    assert c.video.num_frames == 16 and c.rewards.weights == {"r1": 1.0}


def test_tiny_preset_is_a_cpu_demo() -> None:
    c = load_config("tiny")
    assert (c.model.device, c.model.dtype, c.video.image_size, c.video.num_frames) == ("cpu", "fp32", 32, 8)
    assert c.model.synth and c.data.synth and c.coldstart.enabled


def test_unknown_key_wrong_type_and_rule_in_one_error(tmp_path: Path) -> None:
    user = tmp_path / "mine.toml"
    user.write_text(
        'base = "24gb"\n\n[rollout]\nnum_generation = 4\n\n[train]\nlr = "fast"\nmicro_batch_size = 5\n'
    )
    with pytest.raises(ConfigError) as info:
        load_config(str(user))
    assert str(info.value) == (
        f"invalid configuration ({user}), 3 problems:\n"
        f"  - {user}:4: unknown key 'rollout.num_generation'; did you mean 'num_generations'? "
        "valid keys in rollout: num_generations, max_new_tokens, temperature, top_p, top_k, prompts_per_step, sync_every, "
        "cuda_graphs\n"
        f"  - {user}:7: train.lr: expected float, got str 'fast'\n"
        "  - rule: train.micro_batch_size = 5 must divide rollout.prompts_per_step * rollout.num_generations "
        "= 8 * 8 = 64; fix: set train.micro_batch_size to one of 1, 2, 4, 8, 16, 32, 64"
    )


def test_override_problems_name_the_flag_and_skip_dependent_rules() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(
            "24gb",
            [
                "lora.rnak=8",
                "rollout.num_generations=two",
                "model.quant=nf8",
                "grpo.beta=-1",
                "oops",
                "lorra.r=2",
            ],
        )
    lines = str(info.value).splitlines()
    assert lines[0] == "invalid configuration (preset 24gb + --set), 6 problems:"
    assert set(lines[1:]) == {
        "  - --set oops: expected section.key=value, e.g. --set rollout.num_generations=4",
        "  - --set lorra.r=2: unknown section 'lorra'; did you mean 'lora'? valid sections: "
        "model, lora, data, video, rollout, grpo, rewards, coldstart, train, log",
        "  - --set model.quant=nf8: model.quant = 'nf8': must be one of 'nf4', 'none'; did you mean 'nf4'?",
        "  - --set lora.rnak=8: unknown key 'lora.rnak'; did you mean 'r'? valid keys in lora: r, alpha, dropout, target_modules",
        "  - --set rollout.num_generations=two: rollout.num_generations: expected int, got str 'two'",
        "  - --set grpo.beta=-1: grpo.beta = -1.0: must be >= 0",
    }  # no micro-batch rule: num_generations already failed, its rule is skipped rather than guessed


@pytest.mark.parametrize(
    ("override", "rule"),
    [
        (
            "rollout.num_generations=1",
            "rollout.num_generations = 1: must be >= 2 (the advantage divides by the group's std)",
        ),
        ("grpo.epsilon_high=0.1", "grpo.epsilon_high = 0.1 is below grpo.epsilon = 0.2"),
        ("video.num_frames=20", "video.num_frames = 20 exceeds video.max_frames = 16"),
        ("coldstart.enabled=true", "coldstart.enabled = true but data.coldstart is not set"),
        ("train.eval_every=5", "train.eval_every = 5 but data.eval is not set"),
        ("train.output_dir=runs/{name}", "unknown placeholder {name}"),
        ("train.warmup_ratio=1.0", "train.warmup_ratio = 1.0: must be >= 0 and < 1"),
        ("rewards.r1=0", "rewards: no reward with a nonzero weight"),
        ("rewards.r1=nan", "rewards.r1 = nan: weight must be a finite number"),
        ("train.lr=inf", "train.lr = inf: must be a finite number"),
    ],
)
def test_each_rule_fires_alone(override: str, rule: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("24gb", [override])
    message = str(info.value)
    assert "), 1 problem:\n  - " in message and rule in message


def test_overrides_parse_by_field_type() -> None:
    cfg = load_config(
        "24gb",
        [
            "train.steps=100", "train.lr=3e-5", "model.gradient_checkpointing=off", "data.train=a b.jsonl",
            "lora.target_modules=q_proj, v_proj", "video.fps=1", "video.image_size=none", "lora.alpha=16",
            "rewards.my.mod:fn=0.5", "data.eval='quoted.jsonl'", "grpo.kl_clamp=10",
        ],
    )  # fmt: skip
    assert cfg.train.steps == 100 and isinstance(cfg.train.steps, int)
    assert cfg.train.lr == 3e-5
    assert cfg.model.gradient_checkpointing is False
    assert cfg.data.train == "a b.jsonl" and cfg.data.eval == "quoted.jsonl"
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.video.fps == 1.0 and isinstance(cfg.video.fps, float) and cfg.video.image_size is None
    assert cfg.lora.alpha == 16.0 and isinstance(cfg.lora.alpha, float)
    assert cfg.rewards.weights == {"r1": 1.0, "my.mod:fn": 0.5}
    assert cfg.grpo.kl_clamp == 10.0
    assert parse_text('["a", "b"]', list[str]) == ["a", "b"]
    assert parse_text("1.5", int) == "1.5"  # left as text: reported as a wrong type
    assert apply_overrides(cfg, ["grpo.kl_clamp=none"]).grpo.kl_clamp is None


def _random_value(tp: typing.Any, meta: typing.Mapping[str, typing.Any], rng: random.Random) -> typing.Any:
    optional = type(None) in typing.get_args(tp)
    union = typing.get_origin(tp) in (typing.Union, types.UnionType)  # `bool | Literal["offload"]`, `int | None`
    members = [m for m in typing.get_args(tp) if m is not type(None)] if union else [tp]
    if optional and rng.random() < 0.3:
        return None
    m = members[0] if len(members) == 1 else rng.choice(members)
    if typing.get_origin(m) is typing.Literal:
        return rng.choice(typing.get_args(m))
    if typing.get_origin(m) is list:
        return [rng.choice(["q_proj", "x'\"\\y", "ü"]) for _ in range(rng.randint(1, 3))]
    if typing.get_origin(m) is dict:
        return {rng.choice(["r1", "pkg.mod:fn", "format"]): rng.uniform(0.1, 3.0) for _ in range(2)}
    if m is bool:
        return rng.random() < 0.5
    lo = meta.get("ge", meta.get("gt", 0))
    if m is int:
        return int(lo) + rng.randint(1, 40)
    if m is float:
        hi = meta.get("lt", meta.get("le", 10.0))
        return rng.choice([lo + (hi - lo) * rng.random() * 0.99 + 1e-9, 1e-300 * (hi > 0), 1 / 3]) or 0.5
    return rng.choice(["runs/{preset}", 'we"ird\\path\n#x', "hub/id"])


@pytest.mark.parametrize("seed", range(12))
def test_save_load_round_trip(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    sections = {}
    for name, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        sections[name] = cls(
            **{f.name: _random_value(hints[f.name], f.metadata, rng) for f in dataclasses.fields(cls)}
        )
    cfg = Config(**sections, preset=f"run-{seed}", description='say "hi"')
    # a random config may break cross-field rules; keep those that validate, the writer is what's tested
    try:
        cfg = apply_overrides(cfg, [])
    except ConfigError:
        cfg = dataclasses.replace(
            cfg, train=dataclasses.replace(cfg.train, micro_batch_size=1, eval_every=0, output_dir="r"),
            video=dataclasses.replace(cfg.video, fps=1.0), coldstart=dataclasses.replace(cfg.coldstart, enabled=False),
            data=dataclasses.replace(cfg.data, synth=False), grpo=dataclasses.replace(cfg.grpo, epsilon_high=None),
            log=dataclasses.replace(cfg.log, num_completions=0),
            model=dataclasses.replace(cfg.model, liger="auto", dtype="auto", backend="peft"),
        )  # fmt: skip
        cfg = apply_overrides(cfg, [])
    save_config(cfg, tmp_path / "run" / "config.toml")
    back = load_config(str(tmp_path / "run"))
    assert back == cfg
    assert config_to_dict(back) == config_to_dict(cfg)


def test_optional_fields_default_to_none_and_every_field_is_explained() -> None:
    # save_config omits None values; that round-trips only if None is also the default.
    for name, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{name}.{f.name} has no help"
            if type(None) in typing.get_args(hints[f.name]):
                assert f.default is None, f"{name}.{f.name}: optional fields must default to None"


def test_base_inheritance_and_loops(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text(
        'base = "12gb"\n[rollout]\nmax_new_tokens = 100\n[rewards]\nformat = 0.5\n'
    )
    (tmp_path / "b.toml").write_text('base = "a.toml"\n[lora]\nr = 4\n')
    cfg = load_config(str(tmp_path / "b.toml"))
    inherited = load_config("12gb").rollout.num_generations  # untouched by a.toml and b.toml
    assert (cfg.lora.r, cfg.rollout.max_new_tokens, cfg.rollout.num_generations) == (4, 100, inherited)
    assert cfg.rewards.weights == {"r1": 1.0, "format": 0.5} and cfg.preset == "b"
    (tmp_path / "a.toml").write_text('base = "b.toml"\n')
    with pytest.raises(ConfigError, match="`base` forms a loop"):
        load_config(str(tmp_path / "b.toml"))


def test_own_rewards_table_replaces_the_default(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text('[rewards]\naccuracy = 1.0\n"mymod:fn" = 0.25\n')
    assert load_config(str(tmp_path / "c.toml")).rewards.weights == {"accuracy": 1.0, "mymod:fn": 0.25}


def test_bad_sources_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no preset or TOML file '24gbb'; did you mean '24gb'\?"):
        load_config("24gbb")
    bad = tmp_path / "broken.toml"
    bad.write_text("[train\nlr = 1\n")
    with pytest.raises(ConfigError, match=r"broken.toml: not valid TOML: .*line 1"):
        load_config(str(bad))


def test_frozen_and_helpers() -> None:
    cfg = load_config("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0  # type: ignore[misc]
    out = resolve_output_dir(cfg, datetime(2025, 1, 2, 3, 4, 5)).train.output_dir
    assert out == "runs/tiny-20250102-030405"
    check_trainable(cfg)
    with pytest.raises(ConfigError, match="data.train is not set"):
        check_trainable(load_config("24gb"))


def test_cli_list_and_show(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "250")  # no wrapping inside table cells

    assert main(["presets", "list"]) == 0
    listed = capsys.readouterr().out
    for name, _ in list_presets():
        assert name in listed
    assert main(["presets", "show", "12gb", "--set", "rollout.num_generations=6"]) == 0
    shown = capsys.readouterr().out
    assert "num_generations" in shown and "G: completions sampled per prompt" in shown
    assert main(["presets", "show", "16gb", "--toml"]) == 0
    (tmp_path / "x.toml").write_text(capsys.readouterr().out)
    assert load_config(str(tmp_path / "x.toml")) == load_config("16gb")
    assert main(["presets", "show", "16gb", "--set", "lora.rank=3"]) == 2
    assert "did you mean 'r'?" in capsys.readouterr().err



def test_synth_tasks_are_checked_and_groups_expand() -> None:
    from tinyr1.synth import expand_tasks

    cfg = load_config("tiny-video")
    assert cfg.data.synth_tasks == ["first", "last"] and cfg.data.synth_coldstart_n == 64
    with pytest.raises(ConfigError, match=r"data.synth_tasks has unknown task\(s\) 'colour'.*fix: choose from color,"):
        load_config("tiny", ['data.synth_tasks=["colour", "temporal"]'])
    assert load_config("tiny", ['data.synth_tasks=["temporal"]']).data.synth_tasks == ["temporal"]
    assert expand_tasks(["color", "temporal", "first"]) == ["color", "first", "last", "direction", "changes"]
