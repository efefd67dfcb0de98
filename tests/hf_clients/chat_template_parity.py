"""Chat template parity: `strata chat-template` renders conversations character for character
as transformers' `apply_chat_template(tokenize=False)` does, for templates in the styles of
ChatML/Qwen2, Llama 3, Llama 3.1 (its tool branches present but not taken), Mistral, Zephyr,
Gemma, and whitespace-control and namespace cases; with and without the generation prompt.
Conversations the template refuses (raise_exception) must fail in both, with the same message.
A tokenizer_config.json with a list of named templates and AddedToken-style special tokens
checks the loader. Offline: the tokenizer is built in memory."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hf_common  # noqa: E402

hf_common.setup()
transformers, tokenizers = hf_common.require_libraries("transformers", "tokenizers")

BOS, EOS, UNK = "<s>", "</s>", "<unk>"

TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
        "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
    "llama3": (
        "{% set loop_messages = messages %}{% for message in loop_messages %}"
        "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
        "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
        "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
        "{% endif %}"),
    "llama3_1": """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- The system message goes into the system header. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\\n\\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{%- if tools_in_user_message and not tools is none %}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
    {%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
            {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
""",
    "mistral": (
        "{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] %}"
        "{% set loop_messages = messages[1:] %}{% else %}{% set loop_messages = messages %}{% endif %}"
        "{{ bos_token }}{% for message in loop_messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
        "{% endif %}{% if loop.first and system_message is defined %}"
        "{% set content = system_message + '\\n\\n' + message['content'] %}"
        "{% else %}{% set content = message['content'] %}{% endif %}"
        "{% if message['role'] == 'user' %}{{ '[INST] ' + content.strip() + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + eos_token }}{% endif %}"
        "{% endfor %}"),
    "zephyr": (
        "{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
        "{{ '<|user|>\\n' + message['content'] + eos_token }}\n"
        "{% elif message['role'] == 'system' %}\n{{ '<|system|>\\n' + message['content'] + eos_token }}\n"
        "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\\n'  + message['content'] + eos_token }}\n"
        "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n"
        "{% endfor %}"),
    "gemma": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
        "{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
        "{% else %}{% set role = message['role'] %}{% endif %}"
        "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"),
    # Whitespace control, lstrip/trim of indented blocks, comments, namespace, slices, filters.
    "whitespace_namespace": """{# a comment at the start #}
{% set ns = namespace(turns=0, last_user='', seen=[]) %}
  {% for message in messages %}
    {% if message.role == 'user' %}
      {% set ns.turns = ns.turns + 1 %}
      {% set ns.last_user = message.content %}
    {% endif %}
  {% endfor %}
Turns: {{ ns.turns }} of {{ messages | length }}
    {%- for message in messages %}

[{{ loop.index }}/{{ loop.length }}] {{ message.role | upper }} {{ message['role'] | capitalize }}:
{{ message.content }}
  {%+ if loop.last %}(last){% endif +%}
{%- endfor %}
{{ "Last user words: " ~ ns.last_user[:12] ~ "|" }}
{% if messages | length > 1 and messages[-1]['role'] is string %}ends with {{ messages[-1].role }}{% endif %}
{% if add_generation_prompt -%}
   GEN {{ eos_token if eos_token is defined else 'none' }}
{%- endif %}
""",
    # System-message handling with elif chains, 'in', loop.first/last and the generation prompt.
    "system_last": (
        "{%- if messages and messages[0].role == 'system' -%}\n"
        "  {%- set sys = messages[0].content -%}\n"
        "  {%- set rest = messages[1:] -%}\n"
        "{%- else -%}\n"
        "  {%- set sys = 'Default system.' -%}\n"
        "  {%- set rest = messages -%}\n"
        "{%- endif -%}\n"
        "<<SYS>>{{ sys | trim }}<</SYS>>\n"
        "{% for m in rest %}\n"
        "{% if m.role not in ['user', 'assistant'] %}{{ raise_exception('Unknown role ' ~ m.role) }}{% endif %}\n"
        "{% if m.role == 'user' %}\n"
        "USER{{ ' (first)' if loop.first }}: {{ m.content }}\n"
        "{% elif m.role == 'assistant' and not loop.last %}\n"
        "BOT: {{ m.content }}{{ eos_token }}\n"
        "{% else %}\n"
        "BOT(final): {{ m.content }}{{ eos_token }}\n"
        "{% endif %}\n"
        "{% if loop.last and add_generation_prompt and m.role != 'assistant' %}\n"
        "BOT:\n"
        "{% endif %}\n"
        "{% endfor %}"),
}

CONVERSATIONS = {
    "single_user": [{"role": "user", "content": "Hello!"}],
    "system_user_assistant_user": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3?"},
    ],
    "multiline": [
        {"role": "user", "content": "Line one\nLine two\n\n  indented line\n"},
        {"role": "assistant", "content": "Answer:\n- a\n- b\n"},
        {"role": "user", "content": "Thanks\r\nbye"},
    ],
    "whitespace_unicode": [
        {"role": "system", "content": "\u00a0 Sei gentile.\u3000\n"},
        {"role": "user", "content": "  \t caf\u00e9 \u65e5\u672c\u8a9e \U0001F680 \"quotes\" {{ not a tag }} {% nope %}\n\n"},
        {"role": "assistant", "content": "\n\u00fcber\u2003 "},
    ],
    "ends_with_assistant": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello, how can I help?"},
    ],
    "empty_contents": [
        {"role": "user", "content": ""},
        {"role": "assistant", "content": ""},
    ],
    "not_alternating": [
        {"role": "user", "content": "one"},
        {"role": "user", "content": "two"},
    ],
}


def build_tokenizer():
    vocab = {UNK: 0, BOS: 1, EOS: 2}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token=UNK))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS,
                                                eos_token=EOS, unk_token=UNK)


def reference(tokenizer, template, conversation, generation_prompt):
    """(rendering, None) or (None, error message)."""
    try:
        out = tokenizer.apply_chat_template(conversation, chat_template=template, tokenize=False,
                                            add_generation_prompt=generation_prompt)
        return out, None
    except Exception as e:  # the template's raise_exception
        return None, str(e)


def strata_render(template_path, messages_path, generation_prompt, extra=()):
    import subprocess
    cmd = [hf_common.STRATA, "chat-template", "--template", template_path, "--messages",
           messages_path, *extra]
    if generation_prompt:
        cmd.append("--add-generation-prompt")
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return p.returncode, p.stdout.decode("utf-8"), p.stderr.decode("utf-8")


def main():
    checks = hf_common.Checks()
    tokenizer = build_tokenizer()
    for name, conversation in CONVERSATIONS.items():
        with open(f"{name}.json", "w", encoding="utf-8") as f:
            json.dump({"messages": conversation}, f, ensure_ascii=False)
    compared = refused = 0
    cases = []
    for tname, template in TEMPLATES.items():
        path = f"{tname}.jinja"
        with open(path, "w", encoding="utf-8", newline="") as f:
            f.write(template)
        for cname in CONVERSATIONS:
            for gen in (False, True):
                cases.append((tname, path, cname, gen))
    # The binary's start-up (LibTorch) dominates: run the renderings a few at a time.
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda c: strata_render(c[1], f"{c[2]}.json", c[3],
                                                        ("--bos-token", BOS, "--eos-token", EOS)),
                                cases))
    for (tname, path, cname, gen), (rc, out, err) in zip(cases, results):
        template, conversation = TEMPLATES[tname], CONVERSATIONS[cname]
        what = f"{tname} x {cname}{' +generation prompt' if gen else ''}"
        expected, error = reference(tokenizer, template, conversation, gen)
        if error is None:
            compared += 1
            if rc != 0:
                checks.record(False, f"{what}: strata failed: {err.strip()}")
            else:
                checks.equal(what, out, expected, show=f"{len(expected)} characters")
        else:
            refused += 1
            checks.true(f"{what}: both refuse ({error})", rc != 0 and error in err,
                        err.strip())

    # A tokenizer_config.json with named templates and AddedToken-style special tokens.
    os.makedirs("model", exist_ok=True)
    config = {
        "bos_token": {"content": "<|begin|>", "lstrip": False, "normalized": False,
                      "rstrip": False, "single_word": False, "special": True},
        "eos_token": "<|end|>",
        "chat_template": [
            {"name": "tool_use", "template": "{{ raise_exception('not this one') }}"},
            {"name": "default", "template": TEMPLATES["llama3"].replace("'<|eot_id|>'", "eos_token")},
        ],
    }
    with open("model/tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(config, f)
    vocab = {UNK: 0, "<|begin|>": 1, "<|end|>": 2}
    config_tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token=UNK)),
        bos_token="<|begin|>", eos_token="<|end|>", unk_token=UNK)
    for source in ("model", "model/tokenizer_config.json"):
        for cname in ("system_user_assistant_user", "whitespace_unicode"):
            expected, error = reference(config_tokenizer, config["chat_template"][1]["template"],
                                        CONVERSATIONS[cname], True)
            rc, out, err = strata_render(source, f"{cname}.json", True)
            compared += 1
            if rc != 0:
                checks.record(False, f"tokenizer_config ({source}) x {cname}: strata failed: {err.strip()}")
            else:
                checks.equal(f"tokenizer_config ({source}) x {cname}", out, expected,
                             show=f"{len(expected)} characters")
    print(f"{compared} renderings compared, {refused} refusals compared")
    checks.done()


if __name__ == "__main__":
    main()
