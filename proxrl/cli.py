"""The `proxrl` command line. It only wires: every option is a field of a typed config dataclass.

    proxrl train ENV_ID [--option value ...]   PPO on a Gymnasium environment (preset hyperparameters if known)
    proxrl eval RUN_DIR                        deterministic evaluation of a control run's last checkpoint
    proxrl plot RUN_DIR                        (re)draw a run's PNG plots
    proxrl sft ...                             supervised fine-tuning of a causal LM
    proxrl reward-model ...                    pairwise (Bradley-Terry) reward-model training
    proxrl ppo ...                             PPO fine-tuning of a causal LM (RLHF)
    proxrl generate MODEL_DIR --prompt ...     sample from any saved causal LM
    proxrl evaluate --policy DIR --prompts ... held-out reward, KL, win rate vs --reference; report.json + PNG
    proxrl demo                                the offline RLHF pipeline (SFT -> reward model -> PPO) end to end

Bad input ends with one line `error: ...` on stderr and exit status 2; a failure inside user code (a reward
function, an env) exits with 1. Tracebacks only with --debug or PROXRL_DEBUG=1.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Sequence

from proxrl import config as C  # noqa: E402  (proxrl/__init__.py sets OMP_WAIT_POLICY before torch loads)
from proxrl.errors import UserError  # noqa: E402


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad flags as one line and exit status 2, and reads ``-1e-3`` as a number."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-inf$")

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def _fmt(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=36, width=110)


# ----------------------------------------------------------------------------------------- control front-end
def _train(args: argparse.Namespace) -> None:
    from proxrl import distributed as D

    # Under torchrun every process runs this; a failing one reports once and ends the job (no-op alone).
    with D.fail_fast(_debug(args)):
        try:
            _train_control(args)
        except UserError as e:
            if D.dist_info().world_size > 1 and not D.is_main() and not D.is_distributed():
                raise SystemExit(e.exit_code) from None  # bad input before the process group: rank 0 reports it
            raise
    D.shutdown()


def _train_control(args: argparse.Namespace) -> None:
    from proxrl.control import ControlConfig, PRESETS, train
    from proxrl.control.config import RUN_INFO_KEY, config_values
    from proxrl.runs import RunDir

    if args.resume:
        run = RunDir(args.resume)
        given = {k: v for k, v in C.given_options(ControlConfig, args).items() if not (k == "env_id" and v is None)}
        given.pop(RUN_INFO_KEY, None)  # --config of a run's own config.yaml
        cfg = C.resume_config(ControlConfig, config_values(run.read_config()), given, source=str(run.config_path))
        result = train(cfg, run.path, resume=True, progress=not args.no_progress)
        _finish_control_run(run.path, result)
        return
    if not args.env_id:
        raise UserError("missing ENV_ID: give a Gymnasium environment id, e.g. `proxrl train CartPole-v1`")
    base = dict(PRESETS.get(args.env_id, {})) if not args.no_preset else {}
    base["env_id"] = args.env_id
    if getattr(args, "config", None):  # a run's config.yaml also holds its run_info section: not options
        saved = C.load_yaml(args.config)
        if RUN_INFO_KEY in saved:
            base.update(config_values(saved))
            base["env_id"] = args.env_id
            args.config = None
    cfg = C.build(ControlConfig, args, base=base)
    run_dir = args.run_dir or f"runs/{args.env_id}_seed{cfg.seed}_{time.strftime('%Y%m%d-%H%M%S')}"
    result = train(cfg, run_dir, resume=False, progress=not args.no_progress)
    _finish_control_run(run_dir, result)


def _finish_control_run(run_dir: str | Path, result: dict) -> None:
    from proxrl import distributed as D
    from proxrl.control import plot_run

    if not D.is_main():  # under torchrun only rank 0 writes and reports
        return
    plots = plot_run(run_dir)
    print(f"run directory: {run_dir}  (plots: {', '.join(p.name for p in plots)})")
    keys = ("global_step", "eval_return_mean", "eval_return_std", "episodic_return", "train_seconds", "steps_per_second")
    shown = {k: result[k] for k in keys if isinstance(result, dict) and k in result}
    if isinstance(result, dict) and "device" in result:
        shown["device"] = result["device"] + (f" x {result['processes']} processes" if result.get("processes", 1) > 1
                                              else "")
    if shown:
        print("final: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()))


def _eval(args: argparse.Namespace) -> None:
    from proxrl.control import evaluate_run

    r = evaluate_run(args.run_dir, episodes=args.episodes, seed=args.seed, device=args.device,
                     video=args.video_episodes if args.video else 0, video_format=args.video_format,
                     deterministic=args.deterministic)
    print(f"eval {args.run_dir}: mean return {r['mean_return']:.2f} +- {r['std_return']:.2f} over {r['episodes']} "
          f"{'greedy' if r['deterministic'] else 'sampled'} episodes (seed {r['seed']}, "
          f"{Path(r['checkpoint']).name}, device {r['device']})")
    for v in r["videos"]:
        print(f"video: {v}")


def _plot(args: argparse.Namespace) -> None:
    from proxrl.runs import RunDir

    saved = RunDir(args.run_dir).read_config()  # UserError if the run directory or its config is missing
    if "env_id" in saved:
        from proxrl.control import plot_run
    else:
        from proxrl.lm.plots import plot_run
    for p in plot_run(args.run_dir):
        print(p)


# ----------------------------------------------------------------------------------------- LM front-end
def _under_torchrun(command: Callable[[argparse.Namespace], None]) -> Callable[[argparse.Namespace], None]:
    """``command`` as every torchrun process runs it: a failing process reports once (``error: rank R: ...``) and
    ends the job; bad input found before the process group is up is reported by rank 0 alone. A no-op wrapper
    with one process (errors reach :func:`main` as usual)."""

    def run(args: argparse.Namespace) -> None:
        from proxrl import distributed as D

        with D.fail_fast(_debug(args)):
            try:
                command(args)
            except UserError as e:
                if D.dist_info().world_size > 1 and not D.is_main() and not D.is_distributed():
                    raise SystemExit(e.exit_code) from None
                raise
        D.shutdown()

    run.__name__ = run.__qualname__ = command.__name__
    run.__doc__ = command.__doc__
    return run


@_under_torchrun
def _sft(args: argparse.Namespace) -> None:
    from proxrl.lm.sft import train_sft
    from proxrl.lm.supervised import load_run_config
    from proxrl.lm.supervised_config import SFTConfig

    if args.resume:
        train_sft(load_run_config(SFTConfig, args.resume, C.given_options(SFTConfig, args)), resume=True)
        return
    train_sft(C.build(SFTConfig, args))


@_under_torchrun
def _reward_model(args: argparse.Namespace) -> None:
    from proxrl.lm.reward_model import train_reward_model
    from proxrl.lm.supervised import load_run_config
    from proxrl.lm.supervised_config import RewardModelConfig

    if args.resume:
        cfg = load_run_config(RewardModelConfig, args.resume, C.given_options(RewardModelConfig, args))
        train_reward_model(cfg, resume=True)
        return
    train_reward_model(C.build(RewardModelConfig, args))


@_under_torchrun
def _ppo(args: argparse.Namespace) -> None:
    from proxrl.lm.ppo_config import PPOConfig
    from proxrl.lm.ppo_trainer import train_ppo
    from proxrl.runs import RunDir

    if args.resume:
        run = RunDir(args.resume)
        saved = run.read_config()
        saved["run_dir"] = str(args.resume)  # the directory given, wherever the run was copied or moved
        saved.pop("run_info", None)  # where the latest session ran (device, processes): not an option
        saved.setdefault("chat_template", "none")  # runs from before --chat-template used plain-text prompts
        cfg = C.resume_config(PPOConfig, saved, C.given_options(PPOConfig, args), source=str(run.config_path))
        train_ppo(cfg, resume=True)
        return
    train_ppo(C.build(PPOConfig, args))


def _generate(args: argparse.Namespace) -> None:
    import torch

    from proxrl.lm.chat import end_of_turn_token_ids, prompt_token_ids, resolve_chat_template
    from proxrl.lm.generation import generate
    from proxrl.lm.loading import load_causal_lm
    from proxrl.lm.positions import left_pad
    from proxrl.lm.tokenization import load_tokenizer

    from proxrl import distributed as D

    if args.threads < 1:
        raise UserError(f"--threads {args.threads} must be >= 1")
    torch.set_num_threads(args.threads)
    device = D.resolve_device(args.device)
    D.configure_device(device)
    tok = load_tokenizer(args.model_dir)
    template = resolve_chat_template(tok, args.chat_template)  # bad file / template: one line, before the model
    model = load_causal_lm(args.model_dir, trust_remote_code=args.trust_remote_code).eval()
    prompts = args.prompt or [""]
    if template is None:
        enc = tok(prompts, return_tensors="pt", padding=True)
        ids, mask = enc["input_ids"], enc["attention_mask"]
    else:  # each prompt one user message, rendered with the generation prompt (the template writes its own BOS)
        rows = [prompt_token_ids(tok, template, p, f"--prompt {i + 1}") for i, p in enumerate(prompts)]
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        ids, mask = left_pad(rows, pad)
    if ids.shape[1] == 0:
        raise UserError("empty prompt: give --prompt TEXT")
    ctx = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    if ctx is not None and ids.shape[1] + args.max_new_tokens > ctx:
        raise UserError(
            f"prompt of {ids.shape[1]} tokens + --max-new-tokens {args.max_new_tokens} exceeds the "
            f"model's context of {ctx} tokens; shorten the prompt or lower --max-new-tokens"
        )
    gen = torch.Generator().manual_seed(args.seed)
    model, ids, mask = model.to(device), ids.to(device), mask.to(device)
    # the seed's CPU stream on every device (one uniform per row and step)
    uniforms = None if device.type == "cpu" else torch.rand(
        (args.max_new_tokens, ids.shape[0]), generator=gen, dtype=torch.float64).to(device)
    out = generate(model, ids, mask, max_new_tokens=args.max_new_tokens,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   eos_token_id=end_of_turn_token_ids(tok, template) or None, generator=gen, tokenizer=tok,
                   uniforms=uniforms)
    resp = out.sequences[:, out.prompt_len:]
    for p, ids, m in zip(prompts, resp, out.response_mask):
        text = tok.decode(ids[m.bool()], skip_special_tokens=True)
        print(f"{p}\u2502{text}")


def _evaluate(args: argparse.Namespace) -> None:
    from proxrl.lm.evaluate_config import EvaluateConfig
    from proxrl.lm.heldout import run_evaluate

    cfg = C.build(EvaluateConfig, args)
    report = run_evaluate(cfg)
    m = report["metrics"]
    line = f"reward {m['reward_mean']:.4g} +- {m['reward_std']:.4g}"
    if "win_rate" in m:
        line += (f" (reference {m['ref_reward_mean']:.4g} +- {m['ref_reward_std']:.4g}), win rate "
                 f"{m['win_rate']:.3f}, KL to the reference {m['ref_kl']:.4g} nats (k3 {m['ref_kl_k3']:.4g})")
    line += (f", length {m['response_length']:.3g} tokens, distinct-1/2 {m['distinct_1']:.3f}/"
             f"{m['distinct_2']:.3f} on {report['settings']['num_prompts']} prompts")
    print(line)
    print(f"report: {Path(cfg.out) / 'report.json'}  (also rewards.png, samples.md, completions.jsonl)")


def _demo(args: argparse.Namespace) -> None:
    from proxrl.lm.demo_config import DemoConfig
    from proxrl.lm.pipeline import run_demo_config

    run_demo_config(C.build(DemoConfig, args))


# ----------------------------------------------------------------------------------------- parser
def _add_config_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE.yaml", default=None,
                   help="YAML file of option: value pairs (same names as the flags); flags given override it")


def _lazy_cls(module: str, name: str) -> type | None:
    import importlib

    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


class _JoinRepeated(argparse.Action):
    """A dataclass option that may be given several times: the values are joined with commas."""

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[override]
        old = getattr(namespace, self.dest, None)
        setattr(namespace, self.dest, values if old in (None, "") or values is None else f"{old},{values}")


def _repeatable(p: argparse.ArgumentParser, flag: str) -> None:
    """Make ``flag`` (added from a config dataclass) repeatable (``--reward-fn a:f --reward-fn b:g`` -> ``a:f,b:g``)."""
    action = p._option_string_actions.get(flag)
    if action is not None:
        action.__class__ = _JoinRepeated


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog="proxrl", description=__doc__, formatter_class=_fmt)
    parser.add_argument("--version", action="version", version=f"proxrl {__import__('proxrl').__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def add(name: str, fn: Callable, help: str, cfg: tuple[str, str] | None = None, config_flag: bool = True):
        p = sub.add_parser(name, help=help, description=help, formatter_class=_fmt)
        p.set_defaults(func=fn)
        p.add_argument("--debug", action="store_true",
                       help="print the full traceback on an error (also: PROXRL_DEBUG=1)")
        if config_flag:
            _add_config_flag(p)
        if cfg is not None:
            cls = _lazy_cls(*cfg)
            if cls is not None:
                C.add_dataclass_args(p.add_argument_group("options"), cls)
        return p

    needs = list(sys.argv[1:] if argv is None else argv)[:1]  # only build the subcommand asked for (importing torch for `--help` of others is slow)
    want = lambda n: not needs or needs[0] in (n, "-h", "--help") or needs[0].startswith("-")  # noqa: E731

    p = add("train", _train, "Train PPO on a Gymnasium environment (preset hyperparameters for known ids).",
            ("proxrl.control.config", "ControlConfig") if want("train") else None)
    p.add_argument("env_id", nargs="?", metavar="ENV_ID", help="Gymnasium environment id, e.g. CartPole-v1")
    p.add_argument("--run-dir", default=None, help="where to write the run (default: runs/ENV_seedS_TIMESTAMP)")
    p.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue RUN_DIR from its last checkpoint (exactly as if never interrupted) with its saved "
                        "config; only --total-steps (not below the steps done), --target-return, --eval-every, "
                        "--eval-episodes, --eval-deterministic, --checkpoint-every, --keep-checkpoints, --threads, "
                        "--tensorboard, "
                        "--device and --video-every may change (and the number of torchrun processes)")
    sources = (_lazy_cls("proxrl.control.presets", "PRESET_SOURCES") or {}) if want("train") else {}
    p.add_argument("--no-preset", action="store_true",
                   help="ignore the tuned preset for ENV_ID; use plain defaults. Presets: "
                        + "; ".join(f"{k} ({v})" for k, v in sources.items()))
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = add("eval", _eval, "Evaluate a control run's last checkpoint (as its training evaluations did).",
            config_flag=False)
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--episodes", type=int, default=None,
                   help="episodes to average (default: the run's eval_episodes)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the evaluation envs, in [0, 2**63) (default: the run's own evaluation seed, so "
                        "the evaluation logged at the last checkpoint is reproduced)")
    p.add_argument("--device", default="auto",
                   help="where the policy acts: auto (CUDA when available, else CPU), cpu, cuda, cuda:N or mps "
                        "(default: auto)")
    p.add_argument("--sampled", dest="deterministic", action="store_const", const=False, default=None,
                   help="sample actions from the policy (seeded) instead of the greedy action")
    p.add_argument("--greedy", dest="deterministic", action="store_const", const=True,
                   help="greedy actions (argmax / mean); default: the run's eval_deterministic")
    p.add_argument("--video", action="store_true",
                   help="also record greedy episodes as videos in RUN_DIR/videos (MP4 with moviepy, else GIF)")
    p.add_argument("--video-episodes", type=int, default=1, help="episodes to record with --video (default: 1)")
    p.add_argument("--video-format", default="auto", choices=("auto", "mp4", "gif"),
                   help="video file format (default: auto = mp4 when moviepy is installed, else gif)")

    p = add("plot", _plot, "Draw a run's PNG plots into RUN_DIR/plots.", config_flag=False)
    p.add_argument("run_dir", metavar="RUN_DIR")

    resumable = sorted(getattr(_lazy_cls("proxrl.lm.supervised_config", "SFTConfig"), "resumable_fields", ()))
    resume_help = ("continue RUN_DIR from its last checkpoint (written with --checkpoint-every N) with its saved "
                   "config; options given with it may change only: "
                   + ", ".join("--" + f.replace("_", "-") for f in resumable))
    p = add("sft", _sft, "Supervised fine-tuning of a causal LM on text, prompt/completion or chat data "
            "(JSONL, JSON, CSV, Parquet, a datasets directory or hub name).",
            ("proxrl.lm.supervised_config", "SFTConfig") if want("sft") else None)
    p.add_argument("--resume", metavar="RUN_DIR", default=None, help=resume_help)
    p = add("reward-model", _reward_model, "Train a pairwise (Bradley-Terry) reward model on chosen/rejected data "
            "(JSONL, JSON, CSV, Parquet, a datasets directory or hub name).",
            ("proxrl.lm.supervised_config", "RewardModelConfig") if want("reward-model") else None)
    p.add_argument("--resume", metavar="RUN_DIR", default=None, help=resume_help)
    p = add("ppo", _ppo, "PPO fine-tuning of a causal LM against a reward model or reward function (RLHF).",
            ("proxrl.lm.ppo_config", "PPOConfig") if want("ppo") else None)
    p.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue RUN_DIR (this directory, wherever the run was moved) from its last checkpoint with "
                        "its saved config; only --total-updates (not below the updates done), --checkpoint-every, "
                        "--keep-checkpoints, --sample-every, --sample-rows, --plot, --threads, --reward-timeout, "
                        "--eval-prompts, --eval-every, --eval-num-prompts, --forward-batch-size, "
                        "--gradient-checkpointing, --device and --fsdp may change (and the number of torchrun "
                        "processes)")
    _repeatable(p, "--reward-fn")

    p = add("generate", _generate, "Sample completions from a saved causal LM directory.", config_flag=False)
    p.add_argument("model_dir", metavar="MODEL_DIR")
    p.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="tokens to sample per prompt (default: 48)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; 0 = greedy (default: 1.0)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 = off (default: 0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1.0 = off (default: 1.0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    p.add_argument("--device", default="auto",
                   help="where the model runs: auto (CUDA when available, else CPU), cpu, cuda, cuda:N or mps "
                        "(default: auto)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the directory (off by default)")
    p.add_argument("--chat-template", default="auto", metavar="auto|none|PATH.jinja",
                   help="render each prompt as a user message with the generation prompt and stop at the template's "
                        "end-of-turn token: auto (the tokenizer's own template, if any), none (plain text) or a "
                        "Jinja file (default: auto)")

    add("evaluate", _evaluate, "Evaluate a policy on held-out prompts against a reference: reward, KL, length, "
        "distinct-n, win rate, side-by-side samples, report.json and a reward histogram PNG.",
        ("proxrl.lm.evaluate_config", "EvaluateConfig") if want("evaluate") else None)

    add("demo", _demo, "Run the offline RLHF pipeline end to end (SFT -> reward model -> PPO) and show the improvement.",
        ("proxrl.lm.demo_config", "DemoConfig") if want("demo") else None)
    return parser


def _debug(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get("PROXRL_DEBUG", "") not in ("", "0")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        args.func(args)
    except UserError as e:
        if _debug(args):
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is kept (resume with --resume RUN_DIR)", file=sys.stderr)
        return 130
    except Exception as e:  # a bug of ours: one line unless --debug asks for the traceback
        if _debug(args):
            raise
        msg = " ".join(str(e).split())[:300]
        print(f"error: internal error {type(e).__name__}: {msg} (rerun with --debug or PROXRL_DEBUG=1 for the "
              "traceback, and please report it)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
