"""Role-switch cost of MultiAdapterModel vs. peft's set_adapter, against a policy forward, and the
parameter / memory cost of each adapter over the shared base.

    OMP_NUM_THREADS=2 python benchmarks/switch_cost.py [--sizes tiny small] [--batch 8] [--seq-len 96]

Every number comes from this run. The model carries every adapter a PPO run can hold: policy,
reward (+ score head), critic (+ head, initialised from the reward) and policy_init.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForSequenceClassification

from trl_multiadapter.model import (
    CRITIC_ADAPTER,
    POLICY_ADAPTER,
    POLICY_INIT_ADAPTER,
    REWARD_ADAPTER,
    MultiAdapterModel,
)
from trl_multiadapter.testing import build_tiny_model, tiny_llama_config


def write_adapters(size: str, directory: Path) -> tuple[Path, Path]:
    config = dict(target_modules="all-linear", r=8, lora_alpha=16)
    policy = get_peft_model(build_tiny_model(size, seed=0), LoraConfig(task_type="CAUSAL_LM", **config))
    policy.save_pretrained(directory / "policy")
    seq_cls = LlamaForSequenceClassification(tiny_llama_config(size))
    seq_cls.model.load_state_dict(build_tiny_model(size, seed=0).model.state_dict())
    get_peft_model(seq_cls, LoraConfig(task_type="SEQ_CLS", **config)).save_pretrained(directory / "reward")
    return directory / "policy", directory / "reward"


def median_seconds(function, repeats: int, inner: int = 1) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            function()
        samples.append((time.perf_counter() - start) / inner)
    return statistics.median(samples)


def storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def measure(size: str, batch: int, seq_len: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        policy_dir, reward_dir = write_adapters(size, Path(tmp))
        base = build_tiny_model(size, seed=0)
        base_params = sum(p.numel() for p in base.parameters())
        base_bytes = storage_bytes([*base.parameters(), *base.buffers()])
        model = MultiAdapterModel.from_pretrained(
            base,
            policy_adapter=policy_dir,
            reward_adapter=reward_dir,
            reference="policy_init",
            value_model="critic",
            critic_init="reward",
        )
    total_bytes = storage_bytes([*model.parameters(), *model.buffers()])

    def switch():
        with model.role("reward"):
            pass

    def internal_switch():  # what policy_forward/score/reference_logits use around their forwards
        with model._adapters_of("reward"):
            pass

    def peft_switch():
        model.peft_model.set_adapter(REWARD_ADAPTER)
        model.peft_model.set_adapter(POLICY_ADAPTER)

    ids = torch.randint(6, model.config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)

    def policy_forward():  # value_model="critic": a policy pass and a critic pass
        with torch.no_grad():
            model.policy_forward(ids, mask)

    def reference_forward():  # one backbone pass + LM head
        model.reference_logits(ids, mask)

    switch_s = median_seconds(switch, repeats=21, inner=200)
    internal_s = median_seconds(internal_switch, repeats=21, inner=200)
    peft_s = median_seconds(peft_switch, repeats=21, inner=50)
    policy_forward()  # warm-up
    forward_s = median_seconds(policy_forward, repeats=5)
    reference_s = median_seconds(reference_forward, repeats=5)

    print(f"\n== {size}: base {base_params / 1e6:.2f}M parameters, {base_bytes / 2**20:.1f} MiB ==")
    print(f"model.role() enter + exit (restores requires_grad, mode): {switch_s * 1e6:9.1f} us")
    print(f"internal switch enter + exit (used by every forward):     {internal_s * 1e6:9.1f} us")
    print(f"peft set_adapter there and back (for scale):              {peft_s * 1e6:9.1f} us")
    print(f"reference forward, batch {batch} x {seq_len} (1 backbone pass):   {reference_s * 1e3:9.2f} ms")
    print(f"policy forward no-grad (policy + critic passes):          {forward_s * 1e3:9.2f} ms")
    print(f"model.role() switch / reference forward:                  {switch_s / reference_s:9.4%}")
    adapter_bytes = 0
    for adapter in (POLICY_ADAPTER, REWARD_ADAPTER, CRITIC_ADAPTER, POLICY_INIT_ADAPTER):
        parameters = model._adapter_parameters(adapter)
        count = sum(p.numel() for p in parameters)
        adapter_bytes += storage_bytes(parameters)
        print(f"adapter {adapter:<12} {count / 1e3:9.1f}K parameters ({count / base_params:.2%} of the base)")
    heads = [*model.value_head.parameters(), *model.reward_head.parameters()]
    head_bytes = storage_bytes(heads)
    print(f"value + reward heads     {sum(p.numel() for p in heads) / 1e3:9.1f}K parameters")
    print(
        f"memory: model {total_bytes / 2**20:.2f} MiB = base {base_bytes / 2**20:.2f} + adapters "
        f"{adapter_bytes / 2**20:.2f} + heads {head_bytes / 2**20:.3f} MiB "
        f"(unexplained: {total_bytes - base_bytes - adapter_bytes - head_bytes} bytes)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=96)
    args = parser.parse_args()
    torch.manual_seed(0)
    for size in args.sizes:
        measure(size, args.batch, args.seq_len)


if __name__ == "__main__":
    main()
