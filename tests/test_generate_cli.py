"""`python -m qlora_jax.generate` on the embedded SmolLM2 (NF4, bfloat16): a sampled chat reply.
(Its greedy tokens against transformers: tests/models/test_llama_smollm2.py.)"""


def test_generate_cli_chat_and_sampling(capsys):
    from qlora_jax.generate import main

    main(
        [
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
