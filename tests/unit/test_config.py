import dataclasses
import re
import textwrap

import pytest

from megatron_oreal.config import ConfigError, RunConfig, load_config, parse_override


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_defaults_are_the_oreal_7b_recipe():
    cfg = load_config()
    assert isinstance(cfg, RunConfig)
    assert (cfg.data.prompts_per_step, cfg.rollout.sampling.n) == (64, 16)
    assert (cfg.policy.optim.lr, cfg.policy.optim.min_lr) == (5e-7, 1e-7)
    assert (cfg.token_rm.optim.lr, cfg.token_rm.optim.min_lr) == (2e-6, 4e-7)
    assert (cfg.algo.negative_loss_factor, cfg.algo.kl_coef, cfg.algo.actor_freeze_steps) == (0.5, 0.01, 10)
    assert cfg.rollout.sampling.top_p == 0.9 and cfg.rollout.sampling.top_k == 0


def test_yaml_and_overrides(tmp_path):
    path = write(
        tmp_path,
        """
        steps: 5
        rollout:
          sampling: {n: 4, temperature: 0.7}
        policy:
          optim: {lr: 3e-5, warmup_steps: 2}
        token_rm:
          optim: {warmup_steps: 2}
        """,
    )
    cfg = load_config(path, ["run_dir=/tmp/x", "rollout.sampling.n=8", "policy.optim.min_lr=1e-6", "algo.selection=all"])
    assert cfg.steps == 5 and cfg.run_dir == "/tmp/x"
    assert cfg.rollout.sampling.n == 8 and cfg.rollout.sampling.temperature == 0.7
    assert cfg.policy.optim.lr == 3e-5 and cfg.policy.optim.min_lr == 1e-6
    assert cfg.algo.selection == "all"
    # Sections not mentioned keep their own defaults (the RM's LR differs from the policy's).
    assert cfg.token_rm.optim.lr == 2e-6


def test_unknown_key_names_file_key_and_suggests(tmp_path):
    path = write(tmp_path, "rollout:\n  samplng: {n: 4}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg and "rollout.samplng" in msg and "did you mean 'sampling'" in msg


def test_unknown_override_key_suggests():
    with pytest.raises(ConfigError, match=r"algo\.kl_coeff.*did you mean 'kl_coef'"):
        load_config(None, ["algo.kl_coeff=0.1"])


def test_wrong_types_are_rejected():
    with pytest.raises(ConfigError, match=r"steps: expected an integer"):
        load_config(None, ["steps=ten"])
    with pytest.raises(ConfigError, match=r"token_rm\.enabled: expected true/false"):
        load_config(None, ["token_rm.enabled=3"])
    with pytest.raises(ConfigError, match=r"rollout\.sampling\.stop_token_ids: expected a list"):
        load_config(None, ["rollout.sampling.stop_token_ids=5"])


def test_bad_choice_suggests():
    with pytest.raises(ConfigError, match=r"algo\.advantage: 'rlo' is not one of .*did you mean 'rloo'"):
        load_config(None, ["algo.advantage=rlo"])


def test_value_checks():
    with pytest.raises(ConfigError, match=r"rollout\.sampling\.n: algo\.advantage=rloo .* needs n >= 2, got 1"):
        load_config(None, ["rollout.sampling.n=1"])
    with pytest.raises(ConfigError, match=r"data\.prompts_per_step: must be in \[1, inf\), got 0"):
        load_config(None, ["data.prompts_per_step=0"])
    with pytest.raises(ConfigError, match=r"top_p: must be in \(0, 1\], got 1.5"):
        load_config(None, ["rollout.sampling.top_p=1.5"])


# (override, the start of the one-line error). Every numeric field has a range (config.RANGES).
BAD_VALUES = [
    ("policy.optim.lr=-1e-6", "policy.optim.lr: must be in (0, inf), got -1e-06"),
    ("token_rm.optim.lr=0", "token_rm.optim.lr: must be in (0, inf), got 0.0"),
    ("policy.optim.lr=.nan", "policy.optim.lr: must be a finite number, got nan"),
    ("policy.optim.min_lr=1e-3", "policy.optim.min_lr (0.001) must not exceed policy.optim.lr (5e-07)"),
    ("policy.optim.adam_beta2=1.0", "policy.optim.adam_beta2: must be in [0, 1), got 1.0"),
    ("policy.optim.adam_eps=0", "policy.optim.adam_eps: must be in (0, inf), got 0.0"),
    ("algo.kl_coef=-0.1", "algo.kl_coef: must be in [0, inf), got -0.1"),
    ("algo.correct_threshold=1.0", "algo.correct_threshold: must be in [0, 1), got 1.0"),
    ("algo.topk_ratio=0", "algo.topk_ratio: must be in (0, 1], got 0.0"),
    ("algo.max_nonfinite_steps=0", "algo.max_nonfinite_steps: must be in [1, inf), got 0"),
    ("rollout.sampling.temperature=-1", "rollout.sampling.temperature: must be in [0, inf), got -1.0"),
    ("rollout.sampling.top_k=-5", "rollout.sampling.top_k: must be in [0, inf), got -5"),
    ("rollout.mem_fraction_static=1.2", "rollout.mem_fraction_static: must be in (0, 1), got 1.2"),
    ("rollout.max_restarts=-1", "rollout.max_restarts: must be in [0, inf), got -1"),
    ("reward.timeout_s=0", "reward.timeout_s: must be in (0, inf), got 0.0"),
    ("checkpoint.keep=0", "checkpoint.keep: must be in [1, inf), got 0"),
    ("checkpoint.every=-1", "checkpoint.every: must be in [0, inf), got -1"),
    ("eval.batch_size=0", "eval.batch_size: must be in [1, inf), got 0"),
    ("steps=-3", "steps: must be in [1, inf), got -3"),
    ("rollout.sampling.max_new_tokens=0", "rollout.sampling.max_new_tokens: must be in [1, inf), got 0"),
    ("parallel.timeout_minutes=0", "parallel.timeout_minutes: must be in [1, inf), got 0"),
]


@pytest.mark.parametrize("override,message", BAD_VALUES)
def test_every_numeric_field_has_a_range(override, message, tmp_path):
    path = write(tmp_path, "steps: 20\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, [override])
    assert str(err.value) == f"{path}: {message}"


def test_ranges_cover_every_numeric_field():
    from megatron_oreal.config import NONFINITE_OK, RANGES, RunConfig

    def numeric(obj, prefix=""):
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                yield from numeric(v, f"{prefix}{f.name}.")
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                yield f"{prefix}{f.name}"

    assert sorted(numeric(RunConfig())) == sorted(RANGES)
    assert NONFINITE_OK <= set(RANGES)


@pytest.mark.parametrize("overrides,needle", [
    (["rollout.sampling.n=1", "algo.advantage=grpo", "algo.selection=all"], "algo.advantage=grpo"),
    (["rollout.sampling.n=1", "algo.advantage=rloo", "algo.selection=all"], "algo.advantage=rloo"),
    (["rollout.sampling.n=1", "algo.advantage=reinforce", "algo.selection=one_pair"], "algo.selection=one_pair"),
])
def test_combinations_that_cannot_learn(overrides, needle):
    with pytest.raises(ConfigError, match=r"^config: rollout\.sampling\.n: " + re.escape(needle)):
        load_config(None, overrides)
    # n = 1 learns with plain REINFORCE on every sample
    cfg = load_config(None, ["rollout.sampling.n=1", "algo.advantage=reinforce", "algo.selection=all"])
    assert cfg.rollout.sampling.n == 1


def test_warmup_must_fit_in_the_run():
    with pytest.raises(ConfigError, match=r"policy\.optim\.warmup_steps \(10\) must be smaller than steps \(5\)"):
        load_config(None, ["steps=5"])


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "steps: 3\nrollout:\n  sampling: {n: 4\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and "line" in str(err.value) and "malformed YAML" in str(err.value)


def test_missing_file_and_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="expected section.key=value"):
        parse_override("steps")
    with pytest.raises(ConfigError, match="steps: expected an integer"):
        load_config(None, ["steps.x=1"])


def test_sglang_engine_must_match_the_training_tensor_parallel_size():
    # One SGLang engine per TP group of stage 0: a different engine TP would get the wrong shards.
    base = ["rollout.engine=sglang", "parallel.tensor=4"]
    with pytest.raises(ConfigError, match=r"rollout\.tensor_parallel_size \(2\) must equal parallel\.tensor \(4\)"):
        load_config(None, [*base, "rollout.tensor_parallel_size=2"])
    assert load_config(None, [*base, "rollout.tensor_parallel_size=4"]).rollout.tensor_parallel_size == 4
    with pytest.raises(ConfigError, match=r"rollout\.tensor_parallel_size: 16 > 8"):
        load_config(None, ["rollout.engine=sglang", "parallel.tensor=16", "rollout.tensor_parallel_size=16"])
    # The CPU engine holds whole weights: its TP setting is not used, so nothing is checked.
    assert load_config(None, ["parallel.tensor=2", "rollout.tensor_parallel_size=1"]).parallel.tensor == 2


def test_collective_timeout_is_configurable_and_positive():
    assert load_config(None).parallel.timeout_minutes == 30
    assert load_config(None, ["parallel.timeout_minutes=5"]).parallel.timeout_minutes == 5
    with pytest.raises(ConfigError, match=r"parallel\.timeout_minutes: must be in \[1, inf\), got 0"):
        load_config(None, ["parallel.timeout_minutes=0"])


def test_sglang_server_keys_are_validated(tmp_path):
    base = ["rollout.engine=sglang", "rollout.sglang_device=cpu", "rollout.sglang_deterministic=false"]
    cfg = load_config(None, base + ['rollout.sglang_server_args=["--context-length", "128"]'])
    assert cfg.rollout.sglang_server_args == ["--context-length", "128"] and cfg.rollout.sglang_python == ""
    with pytest.raises(ConfigError, match="rollout.sglang_device: 'tpu' is not one of"):
        load_config(None, ["rollout.engine=sglang", "rollout.sglang_device=tpu"])
    with pytest.raises(ConfigError, match="rollout.sglang_deterministic: .*torch_native"):
        load_config(None, ["rollout.engine=sglang", "rollout.sglang_device=cpu"])
    with pytest.raises(ConfigError, match="rollout.sglang_python: .*not an executable"):
        load_config(None, base + [f"rollout.sglang_python={tmp_path / 'nope'}"])
    with pytest.raises(ConfigError, match="rollout.fp8: .*sglang_device=cuda"):
        load_config(None, base + ["rollout.fp8=true"])
