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
  chat_templates.py parquet CONVERSATIONS.json OUT_DIR
                                     the conversations as {"messages": [{role, content}]} rows
                                     in two Parquet files, as a dataset on the Hub ships them
                                     (train-00000-of-00002.parquet, ...), by pyarrow
  chat_templates.py model OUT        OUT/: a tiny random Qwen3ForCausalLM with the qwen3 tokenizer
                                     and its chat template, as save_pretrained writes a model
                                     folder (config.json, model.safetensors, tokenizer files,
                                     generation_config.json)
  chat_templates.py chat_loss MODEL CONVERSATIONS.json SHARD [SHARD ...]
                                     for each packed ulysses shard, a JSON line: MODEL's loss
                                     (AutoModelForCausalLM) on all its sequences as one batch,
                                     with labels made by transformers alone (the stream of
                                     conversations the shard packs, each recognised by its
                                     apply_chat_template ids and labelled by its assistant mask,
                                     -100 elsewhere), the trained labels, and which conversations
                                     (indices) the shard holds, in order

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


def tokenizer(family: str) -> PreTrainedTokenizerFast:
    """The family's tokenizer with its chat template (without the markers)."""
    template, special, added, bos, eos, _ = FAMILIES[family]
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
    return fast


def save_tokenizer(family: str, fast: PreTrainedTokenizerFast, d: str) -> None:
    """The tokenizer files and generation_config.json (the family's EOS ids) in `d`."""
    fast.save_pretrained(d)
    GenerationConfig(eos_token_id=[fast.convert_tokens_to_ids(t) for t in FAMILIES[family][5]]).save_pretrained(d)


def make(out: str) -> None:
    for family in FAMILIES:
        fast = tokenizer(family)
        d = os.path.join(out, family)
        save_tokenizer(family, fast, d)
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


def parquet(conversations: str, out: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"messages": m} for m in json.load(open(conversations))]
    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    table = pa.Table.from_pylist(rows, schema=pa.schema([("messages", pa.list_(message))]))
    os.makedirs(out, exist_ok=True)
    half = (len(rows) + 1) // 2
    for k, part in enumerate([table.slice(0, half), table.slice(half)]):
        pq.write_table(part, os.path.join(out, f"train-{k:05d}-of-00002.parquet"), row_group_size=4)
    print(json.dumps({"rows": len(rows), "files": sorted(os.listdir(out))}))


def model(out: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    tok = tokenizer("qwen3")
    config = Qwen3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                         tie_word_embeddings=True, attn_implementation="eager",
                         eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
    torch.manual_seed(31)
    lm = AutoModelForCausalLM.from_config(config).float().eval()
    # HF's init (std 0.02) gives near-uniform predictions; weights of O(1) activations make a wrong
    # label or mask visible in the loss.
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 1.0 / p.shape[1] ** 0.5)
    lm.save_pretrained(out, safe_serialization=True)
    save_tokenizer("qwen3", tok, out)
    print(json.dumps({"dir": out, "files": sorted(os.listdir(out)), "vocab": len(tok)}))


def chat_loss(model_dir: str, conversations: str, *shards: str) -> None:
    import h5py
    import torch
    from transformers import AutoModelForCausalLM

    tok = AutoTokenizer.from_pretrained(model_dir)
    rendered = []
    for messages in json.load(open(conversations)):
        marked = tok.apply_chat_template(messages, chat_template=FAMILIES["qwen3"][0], tokenize=True,
                                         return_dict=True, return_assistant_tokens_mask=True)
        rendered.append((list(marked["input_ids"]), list(marked["assistant_masks"])))
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for shard in shards:
        with h5py.File(shard, "r") as f:
            ids = torch.from_numpy(f["tokens"][:].astype("int64"))
        stream = ids.flatten().tolist()
        # Walk the packed stream: one conversation after another, the last one possibly cut.
        labels, held = [], []
        while len(labels) < len(stream):
            rest = stream[len(labels):]
            found = [k for k, (c, _) in enumerate(rendered) if c[:len(rest)] == rest[:len(c)]]
            if len(found) != 1:
                sys.exit(f"{shard}: at token {len(labels)} the stream goes on with {len(found)} of the "
                         f"conversations (expected exactly one): {rest[:20]}")
            c, m = rendered[found[0]]
            labels.extend(t if mask else -100 for t, mask in zip(c, m))
            held.append(found[0])
        labels = torch.tensor(labels[:len(stream)]).reshape(ids.shape)
        with torch.no_grad():
            res = lm(input_ids=ids, labels=labels)
        print(json.dumps({"shard": shard, "loss": res.loss.item(), "trained": int((labels[:, 1:] != -100).sum()),
                          "conversations": held, "sequences": ids.shape[0]}))


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "make":
        make(sys.argv[2])
    elif len(sys.argv) == 5 and sys.argv[1] == "expect":
        expect(*sys.argv[2:])
    elif len(sys.argv) == 4 and sys.argv[1] == "tables":
        tables(*sys.argv[2:])
    elif len(sys.argv) == 4 and sys.argv[1] == "parquet":
        parquet(*sys.argv[2:])
    elif len(sys.argv) == 3 and sys.argv[1] == "model":
        model(sys.argv[2])
    elif len(sys.argv) >= 5 and sys.argv[1] == "chat_loss":
        chat_loss(*sys.argv[2:])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
