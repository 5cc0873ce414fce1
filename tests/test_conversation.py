"""Conversation -> input_ids + labels, exactly as xtuner's llava_map_fn + template_map_fn + encode_fn."""

import pytest

from llavaflow.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llavaflow.data.conversation import ConversationError, Turn, encode_turns, llava_turns
from llavaflow.template import PHI3_CHAT, get_template


def test_phi3_chat_template_strings():
    t = get_template("phi3_chat")
    assert t.system == "<|system|>\n{system}<|end|>\n"
    assert t.instruction == "<|user|>\n{input}<|end|>\n<|assistant|>\n"
    assert (t.suffix, t.suffix_as_eos, t.sep, t.stop_words) == ("<|end|>", True, "\n", ("<|end|>",))
    assert t.format_instruction("hi") == "<|user|>\nhi<|end|>\n<|assistant|>\n"
    with pytest.raises(ValueError, match="unknown prompt template"):
        get_template("vicuna")


def test_llava_turns_follows_llava_map_fn():
    conv = [
        {"from": "gpt", "value": "dropped: a leading reply"},
        {"from": "human", "value": "What is this? <image>"},
        {"from": "human", "value": " More."},
        {"from": "gpt", "value": "A cat."},
        {"from": "human", "value": "Colour?"},
        {"from": "gpt", "value": "Black."},
        {"from": "human", "value": "dropped: no reply"},
    ]
    assert llava_turns(conv) == [Turn("<image>\nWhat is this? More.", "A cat."), Turn("Colour?", "Black.")]
    # a message that is only the image: no newline after it, as xtuner strips the joined value
    assert llava_turns([{"from": "human", "value": " <image>\n"}, {"from": "gpt", "value": "x"}]) == [Turn("<image>", "x")]
    with pytest.raises(ConversationError):
        llava_turns([{"from": "system", "value": "x"}])


def test_exact_loss_mask_of_a_multi_turn_conversation_with_an_image(tokenizer):
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    turns = [Turn("<image>\nWhat colour?", "Red."), Turn("And the shape?", "A circle.")]
    ids, labels = encode_turns(turns, tokenizer, PHI3_CHAT, max_length=None)

    # Built by hand from xtuner's encode_fn layout: chunks encoded one call each.
    head = [tokenizer.bos_token_id] + enc("<|user|>\n") + [IMAGE_TOKEN_INDEX] + enc("\nWhat colour?<|end|>\n<|assistant|>\n")
    answer1 = enc("Red.<|end|>")
    prompt2 = enc("<|user|>\nAnd the shape?<|end|>\n<|assistant|>\n")
    answer2 = enc("A circle.<|end|>")
    sep = enc("\n")
    assert ids == head + answer1 + sep + prompt2 + answer2 + sep
    ignore = lambda xs: [IGNORE_INDEX] * len(xs)  # noqa: E731
    assert labels == ignore(head) + answer1 + ignore(sep) + ignore(prompt2) + answer2 + ignore(sep)
    # Only the answers and their <|end|> are supervised; one BOS, no EOS (<|end|> plays that role).
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    supervised = [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert supervised == answer1 + answer2 and supervised.count(end) == 2
    assert ids.count(tokenizer.bos_token_id) == 1 and tokenizer.eos_token_id not in ids
    assert ids.count(IMAGE_TOKEN_INDEX) == 1


def test_truncation_happens_before_image_expansion(tokenizer):
    ids, labels = encode_turns([Turn("<image>\nDescribe.", "A long answer " * 20)], tokenizer, PHI3_CHAT, max_length=12)
    assert len(ids) == len(labels) == 12 and IMAGE_TOKEN_INDEX in ids


def test_system_prompt_only_on_the_first_turn(tokenizer):
    ids, _ = encode_turns([Turn("a", "b"), Turn("c", "d")], tokenizer, PHI3_CHAT, None, system="Be brief.")
    system = tokenizer.convert_tokens_to_ids("<|system|>")
    assert ids[1] == system and ids.count(system) == 1


def test_two_images_in_one_prompt_are_refused(tokenizer):
    with pytest.raises(ConversationError, match="at most one <image>"):
        encode_turns([Turn("<image> and <image>", "x")], tokenizer, PHI3_CHAT, None)


def test_an_image_in_two_turns_or_a_message_that_is_not_an_object_is_malformed():
    """xtuner asserts one <image> per turn only: an image in two turns would take the next sample's image
    features for the second placeholder. A message that is not an object crashed with an AttributeError."""
    two = [{"from": "human", "value": "<image>\nA?"}, {"from": "gpt", "value": "a"},
           {"from": "human", "value": "<image>\nB?"}, {"from": "gpt", "value": "b"}]
    with pytest.raises(ConversationError, match="2 <image> placeholders in one conversation"):
        llava_turns(two)
    with pytest.raises(ConversationError, match="message must be .*got 'hello'"):
        llava_turns(["hello", {"from": "gpt", "value": "x"}])
