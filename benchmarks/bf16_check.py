"""Is bf16 autocast worth it on this CPU? Forward+backward seconds in float32 and under bf16 autocast, same run.

Two workloads, 1 torch thread: the control Nature CNN (``CNNActorCritic``, a minibatch of 256 Breakout frames) and a
4-layer GPT-2 (d=256, vocab 8000; 8 sequences of 128 tokens, the loss a logsumexp of the logits). Prints torch's own
probe of native bfloat16 (oneDNN: AVX512-BF16 or AMX), which ``--bf16 true`` requires on the CPU
(:func:`proxrl.distributed.require_native_bf16`), and the best of ``--repeats`` timings per setting.

Usage: ``python benchmarks/bf16_check.py [--repeats 3]``
"""
from __future__ import annotations

import argparse
import time

import torch


def _best(step, repeats: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    import gymnasium as gym
    from transformers import GPT2Config, GPT2LMHeadModel

    from proxrl.control.cnn import CNNActorCritic
    from proxrl.control.distributions import action_dist_for

    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)()
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"native bfloat16 (AVX512-BF16/AMX): {bool(probe)}")

    frames = torch.randint(0, 256, (256, 4, 84, 84), dtype=torch.uint8)
    actions = torch.randint(0, 4, (256,))
    gpt = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=8000, n_positions=256,
                                     bos_token_id=0, eos_token_id=0))
    tokens = torch.randint(0, 8000, (8, 128))
    for name in ("Nature CNN, 256 frames", "GPT-2 4x256, 8x128 tokens"):
        secs = {}
        for bf16 in (False, True):
            if name.startswith("Nature"):
                cnn = CNNActorCritic((4, 84, 84), action_dist_for(gym.spaces.Discrete(4)), bf16=bf16)
                x = cnn.batch_layout(frames)

                def step(cnn=cnn, x=x):
                    logp, _, value = cnn.evaluate(x, actions)
                    (logp.sum() + value.sum()).backward()
            else:
                def step(bf16=bf16):
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                        logits = gpt(tokens).logits
                    logits.float().logsumexp(-1).mean().backward()
            secs[bf16] = _best(step, args.repeats)
        print(f"{name}: float32 {secs[False]:.3f} s, bf16 autocast {secs[True]:.3f} s per forward+backward "
              f"(bf16 / float32 = {secs[True] / secs[False]:.2f}x the time)")


if __name__ == "__main__":
    main()
