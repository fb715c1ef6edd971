"""`python -m qlora_jax.generate` on a tiny random LLaMA with SmolLM2's tokenizer and chat template
(NF4, bfloat16): a sampled chat reply, decoded without special tokens. (Greedy tokens of the real
SmolLM2 against transformers: tests/models/test_llama_smollm2.py.)"""


def test_generate_cli_chat_and_sampling(tiny_model, capsys):
    from qlora_jax.generate import main

    main(
        [
            "--model",
            tiny_model,
            "--prompt",
            "What is the capital of France?",
            "--chat",
            "--max_new_tokens",
            "12",
            "--quantization",
            "nf4",
            "--temperature",
            "0.7",
            "--top_p",
            "0.9",
            "--seed",
            "3",
        ]
    )
    text = capsys.readouterr().out.strip()
    assert text and "<|im" not in text  # special tokens are stripped from the decoded reply
