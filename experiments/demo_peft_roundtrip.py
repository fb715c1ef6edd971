"""The demo's adapter in PyTorch: peft + transformers load <run>/adapter on the same SmolLM2 GGUF and
must give qlora_jax's logits (fp32) and answers. Usage: python experiments/demo_peft_roundtrip.py
[--run runs/smollm2_demo]; prints and writes <run>/peft_roundtrip.json."""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import peft
import torch
import transformers

from qlora_jax.data.demo_task import PROMPT
from qlora_jax.generate import generate
from qlora_jax.io.gguf import embedded_model_path
from qlora_jax.io.hf import load_tokenizer
from qlora_jax.io.peft import load_adapter
from qlora_jax.models import llama

QUESTIONS = [(17, 25), (48, 39), (93, 88), (61, 14)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", default="runs/smollm2_demo")
    args = parser.parse_args()
    adapter_dir = os.path.join(args.run, "adapter")
    path = embedded_model_path()
    tokenizer = load_tokenizer(path)
    model, frozen = llama.from_pretrained(path, quantization=None, dtype="float32")
    lora, _ = load_adapter(adapter_dir, frozen, model.config)
    directory, name = os.path.split(path)
    base = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    torch_model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    prompts = [tokenizer(PROMPT.format(a=a, b=b))["input_ids"] for a, b in QUESTIONS]
    ours = generate(model, frozen, lora, prompts, max_new_tokens=6)
    rows = []
    worst = 0.0
    for (a, b), ids, out in zip(QUESTIONS, prompts, ours, strict=True):
        with torch.no_grad():
            theirs = torch_model.generate(
                torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )[0, len(ids) :].tolist()
            ref_logits = torch_model(torch.tensor([ids])).logits.numpy()
        logits = np.asarray(model.apply(frozen, lora, np.asarray([ids], np.int32)))
        err = float(np.abs(logits - ref_logits).max() / np.abs(ref_logits).max())
        worst = max(worst, err)
        rows.append(
            {
                "question": f"{a} + {b}",
                "qlora_jax": tokenizer.decode(out, skip_special_tokens=True).strip(),
                "peft_torch": tokenizer.decode(theirs, skip_special_tokens=True).strip(),
                "logits_rel_err": err,
            }
        )
        ours_text, theirs_text = rows[-1]["qlora_jax"], rows[-1]["peft_torch"]
        print(
            f"{a} + {b} = {a + b}: qlora_jax {ours_text!r}, peft+transformers {theirs_text!r}, "
            f"max|dlogit|/max|logit| {err:.1e}"
        )
    result = {
        "adapter": adapter_dir,
        "rows": rows,
        "max_logits_rel_err": worst,
        "identical_answers": all(r["qlora_jax"] == r["peft_torch"] for r in rows),
    }
    with open(os.path.join(args.run, "peft_roundtrip.json"), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
