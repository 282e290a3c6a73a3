"""Hugging Face references for the chat-data tests (tests/chat_data.rs): tiny tokenizers with a
Llama-3-style and a Qwen3-style chat template, built locally (no download), and what transformers'
own `apply_chat_template` makes of conversations.

  chat_templates.py make OUT         OUT/llama3/ and OUT/qwen3/: tokenizer.json,
                                     tokenizer_config.json (chat template), generation_config.json,
                                     written by save_pretrained
  chat_templates.py expect MODEL CONVERSATIONS.json OUT.json
                                     for each conversation: transformers' token ids and its
                                     assistant mask, from the same template with
                                     {% generation %} markers around what the assistant says
                                     (its answer and end-of-turn token; not its header, not an
                                     empty think block the template inserts)
  chat_templates.py tables CONVERSATIONS.json OUT_DIR
                                     the conversations as {"messages": ...} records in
                                     chat.parquet, chat.arrow (IPC file), chat-stream.arrow (IPC
                                     stream) and saved/ (the layout of datasets.save_to_disk: Arrow
                                     stream files, state.json, dataset_info.json), all by pyarrow

Exits non-zero with a message on any problem, so the Rust tests fail instead of skipping.
"""
import json
import os
import sys

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, GenerationConfig, PreTrainedTokenizerFast

TEXT = ("You are a helpful assistant. What is the capital of France? The capital of France is Paris. "
        "Think step by step about the question before you answer it, then answer briefly. ")

# The assistant's part of each turn is wrapped in {% generation %} ... {% endgeneration %}; the
# template the tokenizer saves is the same text without the markers (they render nothing), so
# transformers' assistant mask is an independent statement of what should be trained.
LLAMA3 = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {%- if message['role'] == 'assistant' %}
        {%- generation %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endgeneration %}
    {%- else %}
        {{- message['content'] | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

QWEN3 = """{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}
            {%- if reasoning_content %}
                {%- generation %}{{- '<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' }}{%- endgeneration %}
            {%- else %}
                {{- '<think>\\n\\n</think>\\n\\n' }}
            {%- endif %}
            {%- generation %}{{- content.lstrip('\\n') + '<|im_end|>' }}{%- endgeneration %}
        {%- else %}
            {%- generation %}{{- content + '<|im_end|>' }}{%- endgeneration %}
        {%- endif %}
        {{- '\\n' }}
    {%- elif not (message.role == "system" and loop.first) %}
        {{- raise_exception('Unexpected message role: ' + message.role) }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

MARKERS = ("{%- generation %}", "{%- endgeneration %}")

# family: (template, special tokens (the first ones are bos, eos), added non-special tokens,
# bos, eos, generation_config eos ids by token)
FAMILIES = {
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                        "<|eot_id|>"], [], "<|begin_of_text|>", "<|eot_id|>", ["<|end_of_text|>", "<|eot_id|>"]),
    "qwen3": (QWEN3, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], ["<think>", "</think>"], None, "<|im_end|>",
              ["<|im_end|>", "<|endoftext|>"]),
}


def plain(template: str) -> str:
    for m in MARKERS:
        template = template.replace(m, "")
    return template


def make(out: str) -> None:
    for family, (template, special, added, bos, eos, gen_eos) in FAMILIES.items():
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator([TEXT] * 4, trainer)
        tok.add_special_tokens(special)
        tok.add_tokens(added)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos)
        fast.chat_template = plain(template)
        d = os.path.join(out, family)
        fast.save_pretrained(d)
        GenerationConfig(eos_token_id=[fast.convert_tokens_to_ids(t) for t in gen_eos]).save_pretrained(d)
        print(json.dumps({"family": family, "dir": d, "files": sorted(os.listdir(d)), "vocab": len(fast)}))


def expect(model: str, conversations: str, out: str) -> None:
    tok = AutoTokenizer.from_pretrained(model)
    family = os.path.basename(os.path.normpath(model))
    if plain(FAMILIES[family][0]) != tok.chat_template:
        sys.exit(f"{model}: the saved chat template is not the one built")
    results = []
    for messages in json.load(open(conversations)):
        ids = tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        marked = tok.apply_chat_template(messages, chat_template=FAMILIES[family][0], tokenize=True, return_dict=True,
                                         return_assistant_tokens_mask=True)
        if marked["input_ids"] != ids:
            sys.exit(f"{model}: the marked template renders other tokens than the saved one")
        mask = list(marked["assistant_masks"])
        if sum(mask) == 0:
            sys.exit(f"{model}: transformers marked no assistant token in {messages}")
        results.append({"ids": list(ids), "mask": mask})
    json.dump(results, open(out, "w"))


def tables(conversations: str, out: str) -> None:
    import pyarrow as pa
    import pyarrow.ipc as ipc
    import pyarrow.parquet as pq

    rows = [{"messages": m, "source": "test", "n": i} for i, m in enumerate(json.load(open(conversations)))]
    # reasoning_content appears in some messages only: a nullable struct field.
    message = pa.struct([("role", pa.string()), ("content", pa.string()), ("reasoning_content", pa.string())])
    schema = pa.schema([("source", pa.string()), ("messages", pa.list_(message)), ("n", pa.int64())])
    table = pa.Table.from_pylist(rows, schema=schema)
    os.makedirs(out, exist_ok=True)
    pq.write_table(table, os.path.join(out, "chat.parquet"), row_group_size=2)
    with ipc.new_file(os.path.join(out, "chat.arrow"), schema) as w:
        w.write_table(table, max_chunksize=2)
    with ipc.new_stream(os.path.join(out, "chat-stream.arrow"), schema) as w:
        w.write_table(table, max_chunksize=3)
    saved = os.path.join(out, "saved")
    os.makedirs(saved, exist_ok=True)
    half = (len(rows) + 1) // 2
    names = []
    for k, part in enumerate([table.slice(0, half), table.slice(half)]):
        name = f"data-{k:05d}-of-00002.arrow"
        with ipc.new_stream(os.path.join(saved, name), schema) as w:
            w.write_table(part)
        names.append({"filename": name})
    json.dump({"_data_files": names, "_fingerprint": "test", "_format_columns": None, "_format_kwargs": {},
               "_format_type": None, "_output_all_columns": False, "_split": "train"},
              open(os.path.join(saved, "state.json"), "w"))
    json.dump({"features": {}}, open(os.path.join(saved, "dataset_info.json"), "w"))
    print(json.dumps({"rows": len(rows), "files": sorted(os.listdir(out))}))


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "make":
        make(sys.argv[2])
    elif len(sys.argv) == 5 and sys.argv[1] == "expect":
        expect(*sys.argv[2:])
    elif len(sys.argv) == 4 and sys.argv[1] == "tables":
        tables(*sys.argv[2:])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
