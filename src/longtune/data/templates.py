"""Chat templates (jinja strings in the Hugging Face `chat_template` dialect) selected by the `template` key.

`auto` uses the tokenizer's own template; the named ones let a base model without one train on chat data.
Every template here renders turns incrementally (earlier turns never change), which encode.py relies on.
"""

from __future__ import annotations

from longtune.errors import ConfigError

# ChatML as Qwen2 writes it, without a default system prompt: a system turn appears only when given.
CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Llama 3 / 3.1 instruct layout; the begin-of-text marker is written literally (its vocab always has it).
LLAMA3 = (
    "{{- '<|begin_of_text|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# Mistral instruct (v0.1 style): no system role, so a system prompt is prepended to the first user message.
MISTRAL = (
    "{{- bos_token if bos_token else '' }}"
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set system = messages[0]['content'] + '\\n\\n' %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system = '' %}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- ' ' + message['content'] + (eos_token if eos_token else '') }}"
    "{%- else %}"
    "{{- '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{%- endif %}"
    "{%- endfor %}"
)

# Gemma: the assistant is called 'model', there is no system role (prepended to the first user turn).
GEMMA = (
    "{{- bos_token if bos_token else '' }}"
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set system = messages[0]['content'] + '\\n\\n' %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system = '' %}{%- endif %}"
    "{%- for message in messages %}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{- '<start_of_turn>' + role + '\\n' + (system if loop.first else '') + message['content'] | trim"
    " + '<end_of_turn>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"
)

# A plain-text layout for base models with no chat markup of their own; turns end with the tokenizer's eos.
# The space after 'Assistant:' belongs to the reply: BPE glues a leading space to the next word, so a prompt
# ending in a space would split that token across the prompt/response boundary.
DEFAULT = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{- message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'user' %}{{- 'Human: ' + message['content'] + '\\n' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- 'Assistant: ' + message['content'] + (eos_token if eos_token else '') + '\\n' }}"
    "{%- else %}{{- 'Tool: ' + message['content'] + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- 'Assistant:' }}{%- endif %}"
)

NAMED_TEMPLATES: dict[str, str] = {
    "chatml": CHATML,
    "qwen": CHATML,
    "llama3": LLAMA3,
    "mistral": MISTRAL,
    "gemma": GEMMA,
    "default": DEFAULT,
}


def resolve_chat_template(template: str, tokenizer) -> str:
    """The jinja chat template for the `template` key: `auto` (the tokenizer's own) or a name above."""
    if template == "auto":
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, dict):  # tokenizers may ship several named templates; "default" is the chat one
            own = own.get("default")
        if not own:
            raise ConfigError(
                "template: 'auto' needs a tokenizer with a chat_template, and this one has none; "
                "set template: chatml (or llama3, mistral, gemma, default)"
            )
        return own
    if template not in NAMED_TEMPLATES:
        raise ConfigError(
            f"template: unknown template '{template}'; expected auto or one of {', '.join(NAMED_TEMPLATES)}"
        )
    return NAMED_TEMPLATES[template]
