"""Each data format: the tokens it produces and which of them count in the loss."""

import pytest

from qlora_jax.data.formats import ALPACA_PROMPT, FormatConfig, format_row, prompt_and_reference


def _completion_text(smollm2_tokenizer, example):
    return smollm2_tokenizer.decode([t for t, m in zip(example.ids, example.loss_mask, strict=True) if m])


def test_prompt_completion_masks_the_prompt(smollm2_tokenizer):
    ex = format_row({"prompt": "What is 2 + 3?", "completion": " 5"}, smollm2_tokenizer, FormatConfig(), 0)
    assert smollm2_tokenizer.decode(ex.ids) == "What is 2 + 3? 5<|im_end|>"
    assert _completion_text(smollm2_tokenizer, ex) == " 5<|im_end|>"  # the answer and EOS, nothing else


def test_train_on_prompt_puts_every_token_in_the_loss(smollm2_tokenizer):
    ex = format_row(
        {"prompt": "Hi", "completion": " there"}, smollm2_tokenizer, FormatConfig(train_on_prompt=True), 0
    )
    assert all(ex.loss_mask)


def test_alpaca_uses_the_stanford_prompt_with_and_without_input(smollm2_tokenizer):
    row = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    ex = format_row(row, smollm2_tokenizer, FormatConfig(format="alpaca"), 0)
    text = smollm2_tokenizer.decode(ex.ids)
    assert "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n5" in text
    assert _completion_text(smollm2_tokenizer, ex) == "5<|im_end|>"
    no_input = format_row(
        {"instruction": "Say hi.", "output": "hi"}, smollm2_tokenizer, FormatConfig(format="alpaca"), 0
    )
    assert smollm2_tokenizer.decode(no_input.ids).startswith(
        ALPACA_PROMPT.format(context="", instruction="Say hi.", input_block="")
    )


def test_chat_learns_every_assistant_turn_and_nothing_else(smollm2_tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+3?"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "and 4+4?"},
        {"role": "assistant", "content": "8"},
    ]
    ex = format_row({"messages": messages}, smollm2_tokenizer, FormatConfig(format="chat"), 0)
    assert smollm2_tokenizer.decode(ex.ids) == smollm2_tokenizer.apply_chat_template(messages, tokenize=False)
    # ChatML: an assistant turn is "<content><|im_end|>\n" after the "<|im_start|>assistant\n" header
    assert _completion_text(smollm2_tokenizer, ex) == "5<|im_end|>\n8<|im_end|>\n"


def test_chat_from_prompt_completion_keys(smollm2_tokenizer):
    cfg = FormatConfig(format="chat", prompt_key="question", completion_key="answer")
    ex = format_row({"question": "2+3?", "answer": "5"}, smollm2_tokenizer, cfg, 0)
    assert _completion_text(smollm2_tokenizer, ex) == "5<|im_end|>\n"
    prompt, reference = prompt_and_reference({"question": "2+3?", "answer": "5"}, smollm2_tokenizer, cfg, 0)
    assert smollm2_tokenizer.decode(prompt).endswith("<|im_start|>assistant\n") and reference == "5"


def test_text_learns_every_token(smollm2_tokenizer):
    ex = format_row({"text": "Once upon a time"}, smollm2_tokenizer, FormatConfig(format="text"), 0)
    assert all(ex.loss_mask) and smollm2_tokenizer.decode(ex.ids) == "Once upon a time<|im_end|>"


@pytest.mark.parametrize(
    ("row", "cfg", "match"),
    [
        (
            {"question": "x"},
            FormatConfig(),
            r"row 7: format 'prompt_completion' needs keys \['prompt', 'completion'\], "
            r"missing \['prompt', 'completion'\]; row has \['question'\]",
        ),
        ({"instruction": "x"}, FormatConfig(format="alpaca"), r"missing \['output'\]"),
        ({"messages": [{"content": "hi"}]}, FormatConfig(format="chat"), "needs 'role' and 'content'"),
        (
            {"messages": [{"role": "user", "content": "hi"}]},
            FormatConfig(format="chat"),
            "no assistant message",
        ),
        ("just a string", FormatConfig(), "expected a JSON object"),
    ],
)
def test_malformed_rows_name_the_row_and_the_problem(smollm2_tokenizer, row, cfg, match):
    with pytest.raises(ValueError, match=match):
        format_row(row, smollm2_tokenizer, cfg, 7)


def test_unknown_format_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"data.format 'sharegpt' unknown; valid: \('alpaca', 'chat'"):
        FormatConfig(format="sharegpt")
