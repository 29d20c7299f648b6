"""Our side of the benchmark, driven by ``run.py`` in its own process (our venv).

``CONFIG["systems"]`` maps names to the systems this process hosts (a full run gives every timed
system its own process; ``--quick`` shares one process to save start-up time). A system's ``kind``:
  ``ours``      MultiAdapterPPOTrainer on one MultiAdapterModel (``dtype``: float32, or bfloat16 for
                the opt-in bf16 frozen base)
  ``separate``  the same PPO with four separate model copies (``_separate.SeparateCopiesPPO``)
  ``plain``     no trainer: plain transformers + peft models, row by row without padding, for parity

Commands (see ``_protocol.py``): ``setup``, ``iteration(system, queries)``, ``parity(system, out_path)``
and ``memory(system, batches)``, which must be the only command of a fresh single-system process: it
measures building the system and one iteration per batch above the post-import baseline.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import _protocol

CONFIG = _protocol.read_worker_config()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

torch.set_num_threads(CONFIG["threads"])

import _separate  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

# Both systems' modules are imported here, before any baseline: imports are not PPO memory.
from trl_multiadapter import MultiAdapterPPOConfig, MultiAdapterPPOTrainer, ppo_math  # noqa: E402
from trl_multiadapter.model import MultiAdapterModel  # noqa: E402
from trl_multiadapter.rollout import left_pad  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

WORKDIR = Path(CONFIG["workdir"])
SYSTEMS: dict[str, dict] = {}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# --------------------------------------------------------------------------------------------- ours


class SwitchTimer:
    """Times every role switch: entering and leaving the model's switch context managers, not their body.

    ``role`` (public) and ``_adapters_of`` (the cheap switch the model's own forwards use) are shadowed
    by instance attributes, so every caller goes through the timer. ``role`` switches through
    ``_adapters_of``; a nested enter/exit is inside the outer one's measurement and is not added twice.
    """

    SWITCHES = ("role", "_adapters_of")

    def __init__(self, model):
        self.seconds = 0.0
        self.switches = 0
        self.measuring = False
        for name in self.SWITCHES:
            original = getattr(model, name)
            setattr(model, name, lambda role, original=original: _TimedContext(original(role), self))

    def reset(self) -> None:
        self.seconds, self.switches = 0.0, 0


class _TimedContext:
    def __init__(self, context, timer: SwitchTimer):
        self._context, self._timer = context, timer

    def _timed(self, call, *args):
        timer = self._timer
        if timer.measuring:  # nested inside an outer switch that is being timed already
            return call(*args)
        timer.measuring = True
        start = time.perf_counter()
        try:
            return call(*args)
        finally:
            timer.seconds += time.perf_counter() - start
            timer.measuring = False

    def __enter__(self):
        if not self._timer.measuring:
            self._timer.switches += 1
        return self._timed(self._context.__enter__)

    def __exit__(self, *exc_info):
        return self._timed(self._context.__exit__, *exc_info)


def build_model(dtype: str) -> MultiAdapterModel:
    model = MultiAdapterModel.from_pretrained(
        str(WORKDIR / "base"),
        policy_adapter=str(WORKDIR / "policy_adapter"),
        reward_adapter=str(WORKDIR / "reward_adapter"),
        dtype=DTYPES[dtype],
    )
    head = load_file(str(WORKDIR / "value_head.safetensors"))
    with torch.no_grad():
        model.value_head.weight.copy_(head["weight"].to(model.value_head.weight.dtype))
        model.value_head.bias.copy_(head["bias"].to(model.value_head.bias.dtype))
    _protocol.materialise_parameters(model)
    return model


def build_trainer(model: MultiAdapterModel, tokenizer, spec: dict) -> MultiAdapterPPOTrainer:
    args = MultiAdapterPPOConfig(
        output_dir=str(WORKDIR / "ours_trainer_output"),
        batch_size=spec["batch_size"],
        mini_batch_size=spec["mini_batch_size"],
        ppo_epochs=spec["ppo_epochs"],
        learning_rate=spec["learning_rate"],
        max_new_tokens=spec["response_length"],
        stop_token=None,  # fixed-length responses: every system samples exactly response_length tokens
        seed=spec["seed"],
        lr_scheduler_type="constant",
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
    )
    trainer = MultiAdapterPPOTrainer(model=model, args=args, processing_class=tokenizer)
    trainer.create_optimizer_and_scheduler(None)  # step() does this lazily; here it stays out of the first timed round
    return trainer


def build_ours(spec: dict) -> dict:
    model = build_model(spec["dtype"])
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(WORKDIR / "tokenizer")
    trainer = build_trainer(model, tokenizer, spec)
    return {"model": model, "tokenizer": tokenizer, "trainer": trainer, "switch_timer": SwitchTimer(model)}


def run_trainer_iteration(trainer: MultiAdapterPPOTrainer, queries: list[list[int]]) -> dict:
    """One PPO iteration on the given prompts through the public ``step(query_tensors)``: sampling with
    captured logprobs and values, scoring, optimisation (what a ``train()`` iteration does after drawing
    its batch). The phases come from the trainer's own ``time/*`` metrics."""
    stats = trainer.step([torch.tensor(query, device=trainer.device) for query in queries])
    timings = {key: float(value) for key, value in stats.items() if key.startswith("time/")}
    generate_s, reward_s = timings["time/rollout/generation"], timings["time/rollout/score"]
    return {"generate_s": generate_s, "reward_s": reward_s,
            "step_s": timings["time/iteration"] - generate_s - reward_s,
            "first_ratio": stats["policy/first_ratio"], **timings}


def ours_iteration(state: dict, queries: list[list[int]]) -> dict:
    timer = state["switch_timer"]
    timer.reset()
    start = time.perf_counter()
    parts = run_trainer_iteration(state["trainer"], queries)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, **parts, "switch_s": timer.seconds, "switches": timer.switches}


def ours_parity(state: dict, queries, responses) -> dict[str, torch.Tensor]:
    """The model's passes on fixed ids, as the trainer calls them, on a left-padded batch."""
    model, pad_id = state["model"], state["tokenizer"].pad_token_id
    input_ids, attention_mask = left_pad([q + r for q, r in zip(queries, responses)], pad_id)
    response_length = len(responses[0])
    labels = input_ids[:, -response_length:]
    with torch.no_grad():
        logits, values = model.policy_forward(input_ids, attention_mask, logits_to_keep=response_length + 1)
        ref_logits = model.reference_logits(input_ids, attention_mask, logits_to_keep=response_length + 1)
        scores = model.score(input_ids, attention_mask)
    return {
        "logprobs": ppo_math.logprobs_from_logits(logits[:, :-1], labels).float(),
        "ref_logprobs": ppo_math.logprobs_from_logits(ref_logits[:, :-1], labels).float(),
        "values": values[:, -response_length - 1 : -1].float(),  # V(s_j) at the position predicting token j
        "scores": scores.float(),
    }


# --------------------------------------------------------------------------------------------- separate / plain


def build_separate(spec: dict) -> dict:
    settings = _separate.PPOSettings(batch_size=spec["batch_size"], mini_batch_size=spec["mini_batch_size"],
                                     response_length=spec["response_length"], ppo_epochs=spec["ppo_epochs"],
                                     learning_rate=spec["learning_rate"])
    return {"ppo": _separate.SeparateCopiesPPO(WORKDIR, settings)}


def separate_iteration(state: dict, queries: list[list[int]]) -> dict:
    start = time.perf_counter()
    state["ppo"].iteration(queries)
    return {"seconds": time.perf_counter() - start}


def build_plain(spec: dict) -> dict:
    return {}


# --------------------------------------------------------------------------------------------- commands

BUILDERS = {"ours": build_ours, "separate": build_separate, "plain": build_plain}
ITERATIONS = {"ours": ours_iteration, "separate": separate_iteration}


def _spec(system: str) -> dict:
    if system not in CONFIG["systems"]:
        raise ValueError(f"this worker hosts {sorted(CONFIG['systems'])}, not {system!r}")
    return CONFIG["systems"][system]


def setup() -> dict:
    for name, spec in CONFIG["systems"].items():
        torch.manual_seed(spec["seed"])
        SYSTEMS[name] = BUILDERS[spec["kind"]](spec)
    return {"systems": sorted(SYSTEMS), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__}


def iteration(system: str, queries: list[list[int]]) -> dict:
    return ITERATIONS[_spec(system)["kind"]](SYSTEMS[system], queries)


def parity(system: str, out_path: str) -> dict:
    inputs = json.loads((WORKDIR / "parity.json").read_text())
    kind = _spec(system)["kind"]
    if kind == "plain":
        tensors = _separate.plain_reference_outputs(WORKDIR, inputs["queries"], inputs["responses"])
    elif kind == "ours":
        tensors = ours_parity(SYSTEMS[system], inputs["queries"], inputs["responses"])
    else:
        raise ValueError(f"parity is not defined for {kind!r} systems")
    torch.save(tensors, out_path)
    return {name: list(tensor.shape) for name, tensor in tensors.items()}


def warm_up_library() -> None:
    """Run each kind of pass once on a throwaway tiny model so that library code pages and lazily
    created runtime state (thread pools, kernels) are in the baseline, not in the measured peak."""
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, pad_token_id=0)
    model = transformers.LlamaForCausalLM(config)
    ids = torch.randint(1, 64, (2, 8))
    optimizer = torch.optim.Adam(model.parameters())
    model(input_ids=ids).logits.float().logsumexp(-1).mean().backward()
    optimizer.step()
    with torch.inference_mode():
        model.generate(input_ids=ids, do_sample=True, max_new_tokens=2, min_new_tokens=2, pad_token_id=0)


def memory(system: str, batches: list[list[list[int]]]) -> dict:
    if SYSTEMS or len(CONFIG["systems"]) != 1:
        raise RuntimeError("memory must be the only command of a fresh worker hosting one system")
    spec = _spec(system)
    torch.manual_seed(spec["seed"])
    warm_up_library()

    def run(state: dict) -> None:
        for queries in batches:
            ITERATIONS[spec["kind"]](state, queries)

    result = _protocol.measure_peak(lambda: BUILDERS[spec["kind"]](spec), run)
    return {"system": system, "kind": spec["kind"], "mini_batch_size": spec["mini_batch_size"], **result}


if __name__ == "__main__":
    _protocol.serve({"setup": setup, "iteration": iteration, "parity": parity, "memory": memory})
