"""Unsloth on one shape: FastLanguageModel (NF4 + double quant via bitsandbytes), LoRA on all 7
projections, its recommended `use_gradient_checkpointing="unsloth"` (activations offloaded to
host), PagedAdamW32bit as in bench_torch.py, random tokens. Prints one JSON line (RESULT {...},
child_runs.report); called by bench_throughput.py and bench_context.py.

Unsloth loads only from a directory, so the first run of a preset saves a random model under
--model_dir (bench_models.py: bf16 weights it quantizes as it loads, or for shapes whose 16-bit
weights do not fit the GPU a 4-bit checkpoint); later runs on the same machine reuse it. Start it
as Unsloth asks: imported before transformers, with HF_HUB_OFFLINE=1 and
UNSLOTH_DISABLE_STATISTICS=1 (set below before the import).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")

import unsloth  # noqa: E402,I001  (must come before transformers)
import bench_models  # noqa: E402
import child_runs  # noqa: E402
import torch  # noqa: E402
import torch_steps  # noqa: E402
import transformers  # noqa: E402

from qlora_jax.models.presets import preset  # noqa: E402


def main() -> None:
    a = torch_steps.parser().parse_args()
    if bench_models.fits_in_bf16(a.preset, torch.cuda.get_device_properties(0).total_memory):
        directory = bench_models.bf16_model(a.preset, a.model_dir)
    else:
        directory = bench_models.bnb4bit_model(a.preset, a.model_dir)
    model, _ = unsloth.FastLanguageModel.from_pretrained(
        directory, max_seq_length=a.seq, dtype=torch.bfloat16, load_in_4bit=True
    )
    model = unsloth.FastLanguageModel.get_peft_model(
        model,
        r=a.r,
        lora_alpha=2 * a.r,
        lora_dropout=0.0,
        target_modules=torch_steps.PROJECTIONS,
        bias="none",
        use_gradient_checkpointing="unsloth",
        random_state=0,
        max_seq_length=a.seq,
    )
    unsloth.FastLanguageModel.for_training(model)
    versions = {"unsloth": unsloth.__version__, "transformers": transformers.__version__}
    row = torch_steps.time_steps("unsloth", model, preset(a.preset).vocab_size, a, versions, autocast=False)
    child_runs.report(row)


if __name__ == "__main__":
    main()
