"""The LM trainers on devices and under torchrun (issue 7): PPO (GAE, GRPO), SFT and the reward model with 2 CPU
processes (gloo) give the weights of 1 process with the same global batch; FSDP2; resume with another number of
processes, another device, with or without FSDP; a killed rank; bad input reported once.

Every multi-process run is the real CLI under ``torchrun --standalone --nproc_per_node 2`` in a subprocess (one
thread per process); the 1-process references run in this process. Tolerance: the runs differ only in the order of
float sums (DDP/FSDP averages, per-rank batches); measured largest weight gap 6e-6 (PPO, lr 3e-3, float32), tested
against ATOL = 1e-4.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from proxrl.cli import main
from proxrl.lm.builders import build_tiny_gpt2
from proxrl.lm.loading import save_model_and_tokenizer
from proxrl.lm.tokenization import load_tokenizer
from proxrl.runs import latest_checkpoint, load_checkpoint, read_metrics

ATOL = 1e-4
PROMPTS = ["the cat", "a dog", "hello", "we go", "sun", "my hat"]
CHARS = list("abcdefghijklmnopqrstuvwxyz .")
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
                 "TORCHELASTIC_RUN_ID", "PROXRL_DIST_TIMEOUT")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# ------------------------------------------------------------------------------------------------ helpers


def _tiny_lm(root: Path) -> Path:
    """A 1-layer GPT-2 over a character tokenizer (pad 0, eos 1), saved as an HF directory."""
    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", bos_token="<eos>",
                            pad_token="<pad>").save_pretrained(str(root / "tok"))
    tok = load_tokenizer(root / "tok")
    model = build_tiny_gpt2(tok, n_layer=1, n_embd=32, n_head=2, n_positions=64, seed=0)
    return save_model_and_tokenizer(model, tok, root / "policy")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lm_dist")
    _tiny_lm(root)
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    (root / "rew.py").write_text(
        "import os, signal\n"
        "CALLS = [0]\n"
        "def count_a(prompts, completions):\n"
        "    return [float(c.count('a')) for c in completions]\n"
        "def die_on_rank1(prompts, completions):\n"
        "    CALLS[0] += 1\n"
        "    if os.environ.get('RANK') == '1' and CALLS[0] == 3:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return [float(c.count('a')) for c in completions]\n")
    words = [f"the {w} sat on the {v}" for w in ("cat", "dog", "cow", "hen") for v in ("mat", "log", "rug")]
    (root / "sft.jsonl").write_text("".join(json.dumps({"prompt": w[:7], "completion": w[7:]}) + "\n"
                                            for w in words * 3))
    pairs = [{"prompt": "say ", "chosen": "a" * (1 + i % 4), "rejected": "z" * (1 + i % 3)} for i in range(48)]
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return root


def _ppo_flags(work: Path, run: Path, **kw) -> list[str]:
    opts = {"policy": work / "policy", "prompts": work / "prompts.jsonl", "reward-fn": f"{work / 'rew.py'}:count_a",
            "run-dir": run, "total-updates": 3, "rollout-size": 8, "group-size": 1, "minibatch-size": 8, "epochs": 2,
            "learning-rate": 3e-3, "max-new-tokens": 8, "temperature": 0.7, "sample-every": 0,
            "checkpoint-every": 0, "kl-coef": 0.01, "value-coef": 0.5, "seed": 0, "plot": "false", "device": "cpu"}
    opts.update({k.replace("_", "-"): v for k, v in kw.items()})
    return ["ppo"] + [str(x) for k, v in opts.items() for x in (f"--{k}", v)]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env.update(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    return env


def _torchrun(args: list[str], timeout: float = 150) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "proxrl.cli",
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())


def _ok(res: subprocess.CompletedProcess) -> None:
    assert res.returncode == 0, res.stderr[-3000:]


def _run1(args: list[str]) -> None:
    """One process, in this process (the CLI's own entry point)."""
    assert main(args) == 0


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _ckpt_weights(run: Path, step: int, model: str) -> dict[str, torch.Tensor]:
    tensors, _ = load_checkpoint(run / "checkpoints" / f"step_{step:09d}")
    prefix = f"model.{model}."
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest absolute difference; a saved model directory stores tied weights (lm_head = wte) once."""
    keys = set(a) & set(b)
    assert keys and len(keys) >= min(len(a), len(b))
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in keys)


def _moved(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return _gap(a, b)


@pytest.fixture(scope="module")
def gae_reference(work: Path) -> Path:
    """1 process, GAE with a critic, 4 updates, a checkpoint after each."""
    run = work / "ref_gae"
    _run1(_ppo_flags(work, run, total_updates=4, checkpoint_every=1, keep_checkpoints=4))
    return run


# ------------------------------------------------------------------------------------------------ PPO


@pytest.mark.distributed
def test_ppo_gae_two_processes_equal_one_and_resume_with_one(work, gae_reference):
    run = work / "ddp_gae"
    res = _torchrun(_ppo_flags(work, run, total_updates=3))
    _ok(res)
    assert res.stdout.count("ppo: device cpu, 2 processes (torchrun)") == 1  # rank 0 alone prints and writes
    cfg = (run / "config.yaml").read_text()
    assert "processes: 2" in cfg
    for model in ("policy", "critic"):
        got = _weights(run / model)
        assert _gap(got, _ckpt_weights(gae_reference, 3, model)) < ATOL
        assert _moved(got, _ckpt_weights(gae_reference, 1, model)) > 10 * ATOL  # it did train
    ref_rows, rows = read_metrics(gae_reference)[:3], read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for a, b in zip(ref_rows, rows):  # whole-rollout statistics, not rank 0's half
        for key in ("reward", "ref_kl", "response_length", "score_std", "eos_rate"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
        for key in ("policy_loss", "value_loss", "approx_kl", "grad_norm", "explained_variance"):
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-5), key
    # resume the 2-process run with ONE process: the 4th update equals the 1-process run's
    _run1(["ppo", "--resume", str(run), "--total-updates", "4"])
    for model in ("policy", "critic"):
        assert _gap(_weights(run / model), _weights(gae_reference / model)) < ATOL
    assert "processes: 1" in (run / "config.yaml").read_text()


@pytest.mark.distributed
def test_ppo_grpo_with_lora_two_processes_equal_one(work):
    """GRPO (whole groups on one rank) with LoRA: 2 processes train the adapters as 1 does; only the adapters
    change (and only they have AdamW state), the base weights in the checkpoint are the initial ones."""
    kw = dict(advantage_estimator="grpo", group_size=2, rollout_size=4, total_updates=2, lora_r=4,
              learning_rate=1e-2)
    _run1(_ppo_flags(work, work / "ref_grpo", **kw))
    _ok(_torchrun(_ppo_flags(work, work / "ddp_grpo", **kw)))
    assert not (work / "ddp_grpo" / "critic").exists()
    merged = _weights(work / "ddp_grpo" / "policy")
    assert _gap(merged, _weights(work / "ref_grpo" / "policy")) < ATOL
    assert _moved(merged, _weights(work / "policy")) > 10 * ATOL
    for a, b in zip(read_metrics(work / "ref_grpo"), read_metrics(work / "ddp_grpo")):
        assert b["reward"] == pytest.approx(a["reward"]) and b["ref_kl"] == pytest.approx(a["ref_kl"], abs=1e-6)
    tensors, state = load_checkpoint(work / "ddp_grpo" / "checkpoints" / "step_000000002")
    init = _weights(work / "policy")
    base = {k: v for k, v in tensors.items() if k.startswith("model.policy.") and "lora_" not in k}
    compared = 0
    for key, value in base.items():  # model.policy.base_model.model.<name>[.base_layer].weight
        name = key.removeprefix("model.policy.base_model.model.").replace(".base_layer", "")
        if name in init:
            assert torch.equal(value, init[name]), name
            compared += 1
    assert compared >= len(init) - 1  # every base weight (the tied lm_head is saved once)
    n_lora = sum(1 for k in tensors if k.startswith("model.policy.") and "lora_" in k)
    assert n_lora > 0 and len({k.split(".")[1] for k in tensors if k.startswith("optim.")}) == n_lora


@pytest.mark.distributed
def test_fsdp_resumes_a_one_process_run_and_one_process_resumes_it(work, gae_reference):
    """FSDP2 (2 processes) continues the 1-process run from its checkpoint 2 (whole tensors -> shards), trains one
    update, saves (shards -> whole tensors, whole from_pretrained directories); then ONE process without FSDP
    continues that run: both equal the uninterrupted 1-process run."""
    run = work / "fsdp"
    shutil.copytree(gae_reference, run)
    for step in (3, 4):
        shutil.rmtree(run / "checkpoints" / f"step_{step:09d}")
    for d in ("policy", "critic"):
        shutil.rmtree(run / d)
    res = _torchrun(["ppo", "--resume", str(run), "--total-updates", "3", "--fsdp", "true"])
    _ok(res)
    assert "2 processes (torchrun, FSDP)" in res.stdout
    for model in ("policy", "critic"):
        got = _weights(run / model)
        assert _gap(got, _ckpt_weights(gae_reference, 3, model)) < ATOL
        assert _gap(_ckpt_weights(run, 3, model), got) == 0.0
    assert "fsdp: true" in (run / "config.yaml").read_text()
    _run1(["ppo", "--resume", str(run), "--total-updates", "4", "--fsdp", "false"])
    for model in ("policy", "critic"):
        assert _gap(_weights(run / model), _weights(gae_reference / model)) < ATOL


@pytest.mark.distributed
def test_a_killed_rank_ends_the_job_and_keeps_the_last_checkpoint(work):
    run = work / "killed"
    t0 = time.monotonic()
    res = _torchrun(_ppo_flags(work, run, reward_fn=f"{work / 'rew.py'}:die_on_rank1", checkpoint_every=1,
                               total_updates=4), timeout=120)
    took = time.monotonic() - t0
    assert res.returncode != 0 and took < 90
    assert "rank" in res.stderr and "SIGKILL" in res.stderr  # torchrun's summary names the killed rank
    # rank 1 died in update 3's rollout: the checkpoint of update 1 is complete (update 2's may have been cut off
    # by the teardown; an interrupted save never replaces a good checkpoint)
    last = latest_checkpoint(run, verify=True)
    assert last is not None and last.name in ("step_000000001", "step_000000002")
    _, state = load_checkpoint(run / "checkpoints" / "step_000000001")
    assert state["step"] == 1


@pytest.mark.distributed
def test_bad_input_under_torchrun_is_one_line_from_rank_0(work):
    res = _torchrun(_ppo_flags(work, work / "bad", rollout_size=3, minibatch_size=3), timeout=120)
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert lines == ["error: rank 0: rollout_size x group_size of 3 samples cannot be split evenly over 2 processes; "
                     "make it a multiple of 2 or run 1/3 processes"]
    assert not (work / "bad").exists()


def test_fsdp_without_torchrun_and_bad_devices_are_one_line(work, tmp_path, capsys):
    assert main(_ppo_flags(work, tmp_path / "r", fsdp="true")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --fsdp needs several processes: launch with") and err.count("\n") == 1
    assert main(_ppo_flags(work, tmp_path / "r", device="gpu")) == 2
    assert "device='gpu' must be auto, cpu, cuda, cuda:N or mps" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(_ppo_flags(work, tmp_path / "r", device="cuda")) == 2
        err = capsys.readouterr().err
        assert "CUDA is not available" in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_a_run_saved_on_one_device_resumes_on_another_bit_exactly(work, tmp_path):
    """``--device cpu`` for the first update, ``--device auto`` for the rest: the weights equal an uninterrupted
    run's exactly (on a machine without CUDA ``auto`` is the CPU; the cuda-marked test crosses devices)."""
    full, part = tmp_path / "full", tmp_path / "part"
    _run1(_ppo_flags(work, full, total_updates=2))
    _run1(_ppo_flags(work, part, total_updates=1))
    _run1(["ppo", "--resume", str(part), "--total-updates", "2", "--device", "auto"])
    for model in ("policy", "critic"):
        a, b = _weights(full / model), _weights(part / model)
        assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------ SFT, reward model


def _sft_flags(work: Path, run: Path, **kw) -> list[str]:
    opts = {"data": work / "sft.jsonl", "model": work / "policy", "run-dir": run, "batch-size": 8, "max-steps": 6,
            "learning-rate": 3e-3, "warmup-steps": 2, "eval-every": 3, "log-every": 2, "max-length": 32,
            "eval-fraction": 0.1, "progress": "false", "device": "cpu"}
    opts.update({k.replace("_", "-"): v for k, v in kw.items()})
    return ["sft"] + [str(x) for k, v in opts.items() for x in (f"--{k}", v)]


@pytest.mark.distributed
def test_sft_two_processes_equal_one(work):
    _run1(_sft_flags(work, work / "sft1"))
    res = _torchrun(_sft_flags(work, work / "sft2"))
    _ok(res)
    a, b = _weights(work / "sft1"), _weights(work / "sft2")
    assert _gap(a, b) < ATOL and _moved(a, _weights(work / "policy")) > 10 * ATOL
    ra, rb = read_metrics(work / "sft1"), read_metrics(work / "sft2")
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):  # the whole batch's token-weighted loss and token count
        assert set(x) == set(y)
        for key in ("train_loss", "eval_loss", "tokens", "grad_norm"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-4), key
    assert json.loads((work / "sft2" / "sft_result.json").read_text())["tokens"] == \
        json.loads((work / "sft1" / "sft_result.json").read_text())["tokens"]


def _rm_flags(work: Path, run: Path, **kw) -> list[str]:
    opts = {"data": work / "pairs.jsonl", "model": work / "policy", "run-dir": run, "batch-size": 8, "max-steps": 6,
            "learning-rate": 3e-3, "warmup-steps": 2, "eval-every": 3, "log-every": 2, "eval-fraction": 0.25,
            "progress": "false", "device": "cpu", "checkpoint-every": 3}
    opts.update({k.replace("_", "-"): v for k, v in kw.items()})
    return ["reward-model"] + [str(x) for k, v in opts.items() for x in (f"--{k}", v)]


@pytest.mark.distributed
def test_reward_model_two_processes_equal_one_and_resume_with_one(work):
    """2 FSDP2 processes for 6 steps (a checkpoint at step 3, gathered from the shards) equal 1 process; then ONE
    process without FSDP resumes the 2-process run from its step-3 checkpoint and ends with the same weights."""
    _run1(_rm_flags(work, work / "rm1"))
    _ok(_torchrun(_rm_flags(work, work / "rm2", fsdp="true")))
    a, b = _weights(work / "rm1"), _weights(work / "rm2")
    assert _gap(a, b) < ATOL
    ra, rb = read_metrics(work / "rm1"), read_metrics(work / "rm2")
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        for key in ("train_loss", "train_accuracy", "eval_accuracy", "eval_loss"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6), key
    tensors, _ = load_checkpoint(work / "rm2" / "checkpoints" / "step_000000003")
    assert _moved({k: v for k, v in tensors.items() if k.startswith("model.")},
                  {f"model.{k}": v for k, v in b.items()}) > 10 * ATOL
    _run1(["reward-model", "--resume", str(work / "rm2"), "--fsdp", "false"])  # steps 4..6 again, one process
    assert _gap(_weights(work / "rm2"), a) < ATOL


# ------------------------------------------------------------------------------------------------ CUDA


@cuda
@pytest.mark.cuda
def test_cuda_ppo_places_everything_on_the_gpu_and_resumes_on_the_cpu(work, tmp_path):
    run = tmp_path / "gpu"
    _run1(_ppo_flags(work, run, total_updates=1, device="cuda", bf16="true", checkpoint_every=1))
    assert "device: cuda:0" in (run / "config.yaml").read_text()
    rows = read_metrics(run)
    assert all(torch.isfinite(torch.tensor(r["policy_loss"])) for r in rows)
    tensors, _ = load_checkpoint(run / "checkpoints" / "step_000000001")
    assert all(t.device.type == "cpu" for t in tensors.values())
    _run1(["ppo", "--resume", str(run), "--total-updates", "2", "--device", "cpu"])  # GPU checkpoint -> CPU
    assert "device: cpu" in (run / "config.yaml").read_text()
    back = tmp_path / "cpu_then_gpu"
    _run1(_ppo_flags(work, back, total_updates=1, checkpoint_every=1))
    _run1(["ppo", "--resume", str(back), "--total-updates", "2", "--device", "cuda"])  # CPU checkpoint -> GPU
    assert len(read_metrics(back)) == 2


@cuda
@pytest.mark.cuda
def test_cuda_rollout_and_update_stay_on_the_device(work, tmp_path):
    from proxrl.lm.ppo_config import PPOConfig
    from proxrl.lm.ppo_trainer import PPOTrainer

    cfg = PPOConfig(policy=str(work / "policy"), run_dir=str(tmp_path / "r"), total_updates=1, rollout_size=8,
                    minibatch_size=4, max_new_tokens=8, sample_every=0, plot=False, device="cuda", bf16=True)

    def reward(prompts, completions):
        assert all(isinstance(c, str) for c in completions)  # user code still gets strings
        return [float(c.count("a")) for c in completions]

    trainer = PPOTrainer(cfg, PROMPTS, reward_fn=reward, progress=False)
    assert {p.device.type for p in trainer.models.policy.parameters()} == {"cuda"}
    assert {p.device.type for p in trainer.models.critic.parameters()} == {"cuda"}
    assert {p.device.type for p in trainer.models.ref.parameters()} == {"cuda"}
    m = trainer._one_update()
    assert torch.isfinite(torch.tensor(m["policy_loss"]))
    for st in trainer.optimizer.state.values():
        assert all(v.device.type == "cuda" for k, v in st.items() if torch.is_tensor(v) and k != "step")


@cuda
@pytest.mark.cuda
def test_cuda_sft_with_bf16_autocast(work, tmp_path):
    _run1(_sft_flags(work, tmp_path / "s", device="cuda", bf16="true"))
    rows = read_metrics(tmp_path / "s")
    assert rows[-1]["train_loss"] < rows[0]["eval_loss"] + 1.0
