"""Text -> MindRecord for MindFormers' `MindDataset`: packed pre-training samples and masked SFT samples.

Every sample holds `seq_length + 1` tokens (MindFormers' convention: the model shifts inputs and labels
itself). Schemas:

- pre-training (`text`, `jsonl`): `{"input_ids": int32 [-1]}`. Each document is tokenized Llama-style as
  `<s> doc </s>`, the documents are concatenated and cut into samples; the remainder is dropped.
- fine-tuning (`alpaca`, `chat`): `{"input_ids": int32 [-1], "labels": int32 [-1]}`, rendered in the
  Mixtral-Instruct format `<s>[INST] u1 [/INST] a1</s>[INST] u2 [/INST] a2</s>`. Labels are aligned with
  input_ids (not shifted) and hold -100 on `<s>`, on every `[INST] ... [/INST]` prompt and on padding;
  samples are padded with id 0 to `seq_length + 1` or truncated to it.

The reader side (`mindrecord_info`, `check_dataset`) lets a trainer check a dataset against its YAML.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from fractions import Fraction
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from mixtral_ms.cli import BadInput
from mixtral_ms.outputs import replace_together, stale, temp_path

IGNORE = -100
PAD_ID = 0
FORMATS = ("text", "jsonl", "alpaca", "chat")
TEXT_DOCS = ("line", "paragraph", "file")
PRETRAIN_COLUMNS = {"input_ids": {"type": "int32", "shape": [-1]}}
SFT_COLUMNS = {"input_ids": {"type": "int32", "shape": [-1]}, "labels": {"type": "int32", "shape": [-1]}}
DOMAIN_COLUMN = "domain_ids"  # read by router_type rre (MixtralForCausalLM's domain_ids argument)
INT32_MAX = 2 ** 31 - 1  # every column is int32: a larger value would wrap around
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")


class DataError(BadInput, ValueError):
    """Input data that cannot be turned into samples, or a dataset that does not fit the config."""


# ----------------------------------------------------------------------------------------------- reading

def input_files(paths: Sequence[str], fmt: str) -> List[str]:
    """Files named, plus those under folders (`.txt` for text, `.jsonl`/`.json` otherwise), sorted per folder."""
    suffixes = (".txt",) if fmt == "text" else (".jsonl", ".json")
    out = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names
                           if name.endswith(suffixes))
            if not found:
                raise DataError(f"no {'/'.join(suffixes)} files under {path}")
            out += found
        elif os.path.isfile(path):
            out.append(path)
        else:
            raise DataError(f"no such file or folder: {path}")
    if not out:
        raise DataError("no input given")
    return out


def read_jsonl(path: str) -> Iterator[Tuple[int, dict]]:
    """(line number, record) for each non-blank line; a malformed line raises DataError naming it."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{path}:{number}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: malformed JSON ({err.msg})") from None
            except RecursionError:
                raise DataError(f"{path}:{number}: JSON nested too deeply to read") from None
            if _SURROGATE_ESCAPE.search(line):  # \ud800-\udfff escapes: valid only as pairs
                try:
                    json.dumps(record, ensure_ascii=False).encode("utf-8")
                except UnicodeEncodeError:
                    raise DataError(f"{path}:{number}: a lone UTF-16 surrogate escape (\\ud800-\\udfff) is not "
                                    "text") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            yield number, record


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start})") from None


def documents(paths: Sequence[str], fmt: str, text_docs: str = "line") -> Iterator[str]:
    """Pre-training documents.

    `text`: one document per non-empty line (`text_docs="line"`, the bundled corpus holds a chapter a
    line), per blank-line separated paragraph (`"paragraph"`, for hard-wrapped books), or per file.
    `jsonl`: each record's string field "text".
    """
    if text_docs not in TEXT_DOCS:
        raise DataError(f"unknown text_docs {text_docs!r}; choose one of {', '.join(TEXT_DOCS)}")
    for path in input_files(paths, fmt):
        if fmt == "text":
            text = _read_text(path)
            if text_docs == "line":
                parts = text.splitlines()
            elif text_docs == "paragraph":
                parts = [" ".join(p.split("\n")) for p in text.replace("\r\n", "\n").split("\n\n")]
            else:
                parts = [text]
            yield from (p.strip() for p in parts if p.strip())
        else:
            for number, record in read_jsonl(path):
                if not isinstance(record.get("text"), str):
                    raise DataError(f"{path}:{number}: record has no string field 'text'")
                if record["text"].strip():
                    yield record["text"]


def conversations(paths: Sequence[str], fmt: str) -> Iterator[List[Tuple[str, str]]]:
    """(user, assistant) turns per example, from Alpaca records or chat `messages`.

    Alpaca: the user turn is `instruction`, plus `"\\n\\n" + input` when input is non-empty.
    Chat: user/assistant messages alternate, starting with user and ending with assistant; a leading
    system message (Mixtral has no system role) is prepended to the first user turn with a blank line.
    """
    for path in input_files(paths, fmt):
        for number, record in read_jsonl(path):
            where = f"{path}:{number}"
            if fmt == "alpaca":
                for key in ("instruction", "output"):
                    if not isinstance(record.get(key), str):
                        raise DataError(f"{where}: alpaca record needs a string '{key}'")
                if not isinstance(record.get("input", ""), (str, type(None))):
                    raise DataError(f"{where}: alpaca 'input' must be a string")
                prompt = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
                yield [(prompt, record["output"])]
            else:
                yield _chat_turns(record.get("messages"), where)


def _chat_turns(messages, where: str) -> List[Tuple[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: chat record needs a non-empty list 'messages'")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: each message needs string 'role' and 'content'")
    system = None
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    roles = [m["role"] for m in messages]
    if not messages or roles != ["user", "assistant"] * (len(messages) // 2) or len(messages) % 2:
        raise DataError(f"{where}: messages must alternate user/assistant (an optional system first), "
                        f"ending with assistant; got {', '.join(m['role'] for m in messages) or 'none'}")
    turns = [(messages[i]["content"], messages[i + 1]["content"]) for i in range(0, len(messages), 2)]
    if system:
        turns[0] = (f"{system}\n\n{turns[0][0]}", turns[0][1])
    return turns


# ----------------------------------------------------------------------------------------------- samples

def pack(token_docs: Iterable[List[int]], seq_length: int, bos: int, eos: int) -> Iterator[np.ndarray]:
    """Concatenate `<s> doc </s>` streams and cut them into samples of seq_length + 1 (remainder dropped)."""
    size = seq_length + 1
    buffer: List[int] = []
    start = 0
    for ids in token_docs:
        buffer += [bos, *ids, eos]
        while len(buffer) - start >= size:
            yield np.asarray(buffer[start:start + size], np.int32)
            start += size
        if start > 1 << 16:
            buffer, start = buffer[start:], 0


def render_instruct(turns: Sequence[Tuple[str, str]], encode, bos: int, eos: int) -> Tuple[List[int], List[int]]:
    """Mixtral-Instruct: `<s>[INST] u1 [/INST] a1</s>[INST] u2 [/INST] a2</s>`; labels only on answers + `</s>`.

    Tokenized the way Llama/Mistral's SentencePiece tokenizer splits the joined string: each prompt gets
    the tokenizer's prefix space (`▁[INST]`), each answer starts a word after `[/INST]` (`▁a1`).
    """
    ids, labels = [bos], [IGNORE]
    for user, assistant in turns:
        prompt = encode(f"[INST] {user} [/INST]")
        answer = encode(assistant.lstrip(" ")) + [eos]
        ids += prompt + answer
        labels += [IGNORE] * len(prompt) + answer
    return ids, labels


def sft_samples(examples: Iterable[Sequence[Tuple[str, str]]], encode, seq_length: int, bos: int, eos: int,
                pad: int = PAD_ID, stats: Optional[dict] = None) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """Padded/truncated (input_ids, labels) pairs of seq_length + 1; examples whose answer starts past the
    window are skipped (nothing to learn). `stats` (if given) counts "truncated" and "skipped"."""
    size = seq_length + 1
    stats = stats if stats is not None else {}
    stats.setdefault("truncated", 0)
    stats.setdefault("skipped", 0)
    for turns in examples:
        ids, labels = render_instruct(turns, encode, bos, eos)
        if len(ids) > size:
            stats["truncated"] += 1
            ids, labels = ids[:size], labels[:size]
        if all(label == IGNORE for label in labels):
            stats["skipped"] += 1
            continue
        fill = size - len(ids)
        yield (np.asarray(ids + [pad] * fill, np.int32), np.asarray(labels + [IGNORE] * fill, np.int32))


def with_domain(columns: Dict[str, dict], samples: Iterable[Dict[str, np.ndarray]],
                domain: Optional[int]) -> Tuple[Dict[str, dict], Iterable[Dict[str, np.ndarray]]]:
    """Tag every token of every sample with `domain` (a `domain_ids` column as long as input_ids, the
    expert group of router_type rre); `domain` None leaves columns and samples as they are."""
    if domain is None:
        return columns, samples
    if not isinstance(domain, int) or isinstance(domain, bool) or not 0 <= domain <= INT32_MAX:
        raise DataError(f"domain id must be an integer in 0..{INT32_MAX} (an int32 column), got {domain!r}")
    tagged = ({**s, DOMAIN_COLUMN: np.full_like(s["input_ids"], domain)} for s in samples)
    return {**columns, DOMAIN_COLUMN: {"type": "int32", "shape": [-1]}}, tagged


# ----------------------------------------------------------------------------------------------- MindRecord

def _is_mindrecord(path: str) -> bool:
    """`path` and `path.db` look like a MindRecord pair (the .db is MindRecord's SQLite index)."""
    try:
        with open(path + ".db", "rb") as f:
            return os.path.isfile(path) and f.read(16) == b"SQLite format 3\x00"
    except OSError:
        return False


def check_output(output: str, inputs: Sequence[str], overwrite: bool) -> None:
    """Refuse an output that is (or is inside) an input, or that exists and is not a MindRecord pair
    (`--overwrite` replaces only what this tool writes), or exists without `overwrite`."""
    out = os.path.realpath(output)
    for path in inputs:
        real = os.path.realpath(path)
        if out in (real, real + ".db") or out.startswith(real + os.sep) or real == out + ".db":
            raise DataError(f"--output {output} is (or is inside) the input {path}; write it elsewhere")
    if os.path.isdir(output):
        raise DataError(f"{output} is a folder; name a .mindrecord file")
    for target in (output, output + ".db"):  # the index names its data file: a link would split the pair
        if os.path.islink(target):
            raise DataError(f"{target} is a symbolic link; name the MindRecord file itself")
    existing = [t for t in (output, output + ".db") if os.path.lexists(t)]
    if existing and not _is_mindrecord(output):
        raise DataError(f"{existing[0]} exists and is not a MindRecord file this tool wrote; refusing to replace it")
    if existing and not overwrite:
        raise DataError(f"{output} exists; pass --overwrite to replace it")


def _writer_error(err: RuntimeError, output: str) -> "DataError":
    """MindRecord's many-line C++ error as one line, with the free space (a full disk is the usual cause)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    message = next((line for line in lines if line.startswith("[ERROR]")), lines[0] if lines else "failed")
    folder = os.path.dirname(os.path.abspath(output))
    free = shutil.disk_usage(folder).free
    return DataError(f"writing {output} failed: {message} ({free >> 20} MiB free in {folder}; disk full "
                     "or a file size limit?)")


def _check_space(folder: str, batch: List[Dict[str, np.ndarray]], output: str) -> None:
    """Stop with a DataError before a batch that would fill the disk: MindRecord's writer crashes (SIGSEGV)
    when a write fails, so a full disk must never reach it. Allows for a page and the index beside it."""
    need = 2 * sum(np.asarray(v).nbytes for sample in batch for v in sample.values()) + (2 << 20)
    free = shutil.disk_usage(folder).free
    if free < need:
        raise DataError(f"disk full: writing {output} needs about {need / 2**20:.1f} MiB more, "
                        f"{free / 2**20:.1f} MiB free in {os.path.dirname(folder)}")


def write_mindrecord(output: str, columns: Dict[str, dict], samples: Iterable[Dict[str, np.ndarray]],
                     overwrite: bool = False, defer: bool = False):
    """Write samples to `output` (+ its `.db` index) in the hidden temp folder `.<name>.tmp-<pid>` beside it,
    then rename both into place. Refuses what check_output refuses; an interrupted or failed run leaves
    nothing behind, and a killed run's temp folder is removed by the next run to the same output.
    Returns the sample count; zero samples is a DataError. With `defer`, nothing is renamed: returns
    (count, [(finished temp file, target)], temp folder) for the caller to replace_together with other
    outputs and then remove the temp folder.
    """
    from mindspore.mindrecord import FileWriter
    check_output(output, (), overwrite)
    targets = [output, output + ".db"]
    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    name = os.path.basename(output)
    for old in stale(output, "tmp", hidden=True):
        if all(entry in (name, name + ".db") for entry in os.listdir(old)):
            shutil.rmtree(old)
    tmp = temp_path(output, hidden=True)
    os.makedirs(tmp)

    def writing(step, *args):
        """A call of MindRecord's writer; its (many-line, C++) RuntimeError as one DataError line. Only the
        writer's own calls: an error of the samples' generator (a bad input line) keeps its own message."""
        try:
            return step(*args)
        except RuntimeError as err:
            raise _writer_error(err, output) from None
    try:
        writer = writing(FileWriter, os.path.join(tmp, name), 1, True)
        writing(writer.add_schema, columns, "mixtral_ms")
        count, batch = 0, []
        for sample in samples:
            if count == 0 and not batch:
                # MindRecord's defaults (16 MB header, 32 MB pages) make even a tiny dataset a 50 MB (sparse)
                # file. 1 MB pages that fit a few samples, and a 1 MB header (page table for some GB of data).
                need = 4 * sum(np.asarray(v).nbytes for v in sample.values())
                writing(writer.set_header_size, 1 << 20)
                writing(writer.set_page_size, min(max(1 << 20, need), 1 << 28))
            batch.append(sample)
            if len(batch) == 1024:
                _check_space(tmp, batch, output)
                writing(writer.write_raw_data, batch)
                count, batch = count + len(batch), []
        if batch:
            _check_space(tmp, batch, output)
            writing(writer.write_raw_data, batch)
            count += len(batch)
        if count == 0:
            raise DataError("the input gives zero samples (empty, or too short for one sequence of "
                            "seq_length + 1 tokens?)")
        writing(writer.commit)
        if not defer:  # both files or neither (outputs.replace_together)
            replace_together([(os.path.join(tmp, os.path.basename(t)), t) for t in targets])
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if defer:
        return count, [(os.path.join(tmp, os.path.basename(t)), t) for t in targets], tmp
    shutil.rmtree(tmp, ignore_errors=True)
    return count


_MINDRECORD = re.compile(r"mindrecord\d*$")  # the files MindFormers reads from a dataset_dir folder


def mindrecord_files(path: str) -> List[str]:
    """The MindRecord files of a dataset as MindFormers' `dataset_dir` names it: one file, or every file
    under a folder whose name ends in `mindrecord` (recursively, sorted), e.g. one per domain."""
    if os.path.isdir(path):
        files = sorted(os.path.join(root, f) for root, _, names in os.walk(path) for f in names
                       if _MINDRECORD.search(f))
        if not files:
            raise DataError(f"no MindRecord file (*.mindrecord) under {path}")
    elif os.path.isfile(path):
        files = [path]
    else:
        raise DataError(f"no dataset at {path}")
    for file in files:
        if not os.path.isfile(file + ".db"):
            raise DataError(f"{file} has no index file {file}.db beside it; is it a MindRecord file?")
    return files


def mindrecord_info(path: str) -> Dict[str, object]:
    """Columns, tokens per sample and sample count of a MindRecord file (or folder: mindrecord_files).

    Returns {"columns": [...], "seq_length": tokens per sample (seq_length + 1 of the config that fits),
    "num_samples": n}. Raises DataError for a missing or unreadable file, ragged or empty data.
    """
    files = mindrecord_files(path)
    import mindspore.dataset as ds

    def first_row(names):
        try:
            dataset = ds.MindDataset(names, shuffle=False)
            return next(dataset.create_dict_iterator(num_epochs=1, output_numpy=True), None), dataset
        except RuntimeError as err:
            raise DataError(f"cannot read {path} as MindRecord: {str(err).strip().splitlines()[0]}") from None

    shapes = []  # each file's (columns, lengths): a folder mixing them fails mid-run inside MindSpore
    for file in files if len(files) > 1 else ():
        row, _ = first_row([file])
        if row is not None:
            shapes.append((file, {name: int(np.asarray(value).shape[-1]) for name, value in row.items()}))
    for file, lengths in shapes[1:]:
        first, first_lengths = shapes[0]
        if lengths != first_lengths:
            what = "columns" if set(lengths) != set(first_lengths) else "sample lengths"
            raise DataError(f"{path}: its MindRecord files differ in {what}: {first} has {first_lengths}, "
                            f"{file} has {lengths}; a dataset folder needs one schema and one seq_length")
    row, dataset = first_row(files)
    try:
        size = dataset.get_dataset_size()
    except RuntimeError as err:
        raise DataError(f"cannot read {path} as MindRecord: {str(err).strip().splitlines()[0]}") from None
    if row is None:
        raise DataError(f"{path} holds no samples")
    if "input_ids" not in row:
        raise DataError(f"{path} has no 'input_ids' column (columns: {', '.join(row)})")
    lengths = {name: int(np.asarray(value).shape[-1]) for name, value in row.items()}
    if len(set(lengths.values())) != 1:
        raise DataError(f"{path}: columns differ in length: {lengths}")
    return {"columns": list(row), "seq_length": lengths["input_ids"], "num_samples": int(size)}


def check_domain_ids(path: str, groups: int) -> None:
    """router_type rre with `groups` > 1 expert groups picks each token's group by its domain id, which the
    graph does not bound-check: raise DataError unless every id of the `domain_ids` column is in
    0..groups-1. Reads that one column once, before the model is built."""
    import mindspore.dataset as ds
    dataset = ds.MindDataset(mindrecord_files(path), columns_list=[DOMAIN_COLUMN], shuffle=False)
    low, high = 0, 0
    for (ids,) in dataset.batch(1024).create_tuple_iterator(num_epochs=1, output_numpy=True):
        low, high = min(low, int(ids.min())), max(high, int(ids.max()))
    if low < 0 or high >= groups:
        raise DataError(f"{path} holds domain id {low if low < 0 else high}, but router_type rre has rre_groups "
                        f"{groups} (domain ids 0..{groups - 1}); re-run scripts/preprocess_data.py with --domain_id "
                        f"in that range or raise rre_groups")


def check_dataset(path: str, seq_length: int, columns: Optional[Sequence[str]] = None,
                  domain_groups: int = 1) -> Dict[str, object]:
    """Raise DataError unless samples hold seq_length + 1 tokens (the YAML's model seq_length), carry
    `columns` (e.g. the YAML's input_columns) and, for `domain_groups` > 1 (router_type rre's rre_groups),
    domain ids of those groups (check_domain_ids); returns mindrecord_info's dict."""
    info = mindrecord_info(path)
    length = info["seq_length"]
    if length != seq_length + 1:
        raise DataError(f"{path} holds samples of {length} tokens (seq_length {length - 1}), but the config's "
                        f"seq_length {seq_length} needs {seq_length + 1}; re-run scripts/preprocess_data.py "
                        f"with --seq_length {seq_length} or set seq_length: {length - 1}")
    missing = [c for c in columns or () if c not in info["columns"]]
    if missing:
        raise DataError(f"{path} lacks column(s) {', '.join(missing)} (it has {', '.join(info['columns'])}); "
                        f"fine-tuning data needs --format alpaca or chat")
    if domain_groups > 1:
        if DOMAIN_COLUMN not in info["columns"]:
            raise DataError(f"{path} has no {DOMAIN_COLUMN} column, which router_type rre with {domain_groups} "
                            f"expert groups routes by; re-run scripts/preprocess_data.py with --domain_id")
        check_domain_ids(path, domain_groups)
    return info


# ----------------------------------------------------------------------------------------------- pipeline

def heldout_path(output: str) -> str:
    """The held-out split's default file beside the training one: `X.mindrecord` -> `X_heldout.mindrecord`."""
    stem = output[:-len(".mindrecord")] if output.endswith(".mindrecord") else output
    return stem + "_heldout.mindrecord"


def is_heldout(index: int, fraction: Fraction) -> bool:
    """Whether document `index` (0-based, in reading order) is held out: exactly floor(N * fraction) of N
    documents, spread evenly (with 0.1 the 10th, 20th, ... document), so every part of the corpus is seen."""
    return (index + 1) * fraction.numerator // fraction.denominator > index * fraction.numerator // fraction.denominator


def split_heldout(items: Iterable, fraction: float) -> Tuple[Iterator, List]:
    """(training items, held-out items): the first a generator, the second a list that fills as it runs."""
    share = Fraction(str(fraction)).limit_denominator(10 ** 6)
    heldout: List = []

    def train():
        for index, item in enumerate(items):
            if is_heldout(index, share):
                heldout.append(item)
            else:
                yield item
    return train(), heldout


def _write_split(output: str, heldout_output: str, columns, make_samples, items, fraction: float,
                 overwrite: bool, stats: dict) -> int:
    """Write the training and held-out MindRecords, each in its hidden temp folder beside its own target
    (so no rename crosses a filesystem), then rename all four files into place together
    (outputs.replace_together): a failure in either split, or in any rename, leaves the old outputs as
    they were."""
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    os.makedirs(os.path.dirname(os.path.abspath(heldout_output)), exist_ok=True)
    for old in stale(output + ".split", "tmp", hidden=True):  # left by a killed run of an earlier version
        shutil.rmtree(old)
    folders = []
    try:
        train, heldout = split_heldout(items, fraction)
        count, moves, folder = write_mindrecord(output, columns, make_samples(train), overwrite, defer=True)
        folders.append(folder)
        if not heldout:
            raise DataError(f"--heldout_fraction {fraction} holds out no document of the input; raise it")
        train_counts = dict(stats)  # make_samples counts documents and tokens; keep the training split's
        try:
            heldout_count, heldout_moves, folder = write_mindrecord(heldout_output, columns,
                                                                    make_samples(iter(heldout)), overwrite, defer=True)
        except DataError as err:
            raise DataError(f"held-out split ({len(heldout)} documents): {err}") from None
        folders.append(folder)
        replace_together(moves + heldout_moves)
        stats.clear()
        stats.update(train_counts, heldout_documents=len(heldout), heldout_samples=heldout_count)
    finally:
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)
    return count


def preprocess(inputs: Sequence[str], fmt: str, tokenizer_path: str, seq_length: int, output: str,
               overwrite: bool = False, text_docs: str = "line", stats: Optional[dict] = None,
               domain: Optional[int] = None, heldout_fraction: float = 0.0,
               heldout_output: Optional[str] = None) -> int:
    """The whole pipeline; returns the number of samples written (`stats` gets extra counts).
    `domain`: write a `domain_ids` column (with_domain). With `heldout_fraction` > 0, whole documents
    (chapters; examples for the instruction formats) chosen by is_heldout go to `heldout_output` (default
    heldout_path(output)) instead, never to `output`."""
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if text_docs not in TEXT_DOCS:
        raise DataError(f"unknown text_docs {text_docs!r}; choose one of {', '.join(TEXT_DOCS)}")
    if seq_length < 1:
        raise DataError(f"seq_length must be at least 1, got {seq_length}")
    if not os.path.isfile(tokenizer_path):
        raise DataError(f"no tokenizer at {tokenizer_path}")
    if not 0 <= heldout_fraction < 1:
        raise DataError(f"--heldout_fraction must be in [0, 1), got {heldout_fraction}")
    heldout_output = (heldout_output or heldout_path(output)) if heldout_fraction else None
    if heldout_output and os.path.abspath(heldout_output) == os.path.abspath(output):
        raise DataError(f"the held-out output {heldout_output} is the training output; name another file")
    files = input_files(inputs, fmt)  # fail on a missing input before anything is written
    for target in filter(None, (output, heldout_output)):
        check_output(target, inputs, overwrite)
    import sentencepiece as spm
    try:
        sp = spm.SentencePieceProcessor(model_file=tokenizer_path)
    except (RuntimeError, OSError) as err:
        raise DataError(f"cannot load tokenizer {tokenizer_path}: {str(err).strip().splitlines()[0]}") from None
    bos, eos = sp.bos_id(), sp.eos_id()
    if bos < 0 or eos < 0:
        raise DataError(f"tokenizer {tokenizer_path} lacks <s> or </s>")
    stats = stats if stats is not None else {}
    if fmt in ("text", "jsonl"):
        def counted(docs):
            for doc in docs:
                stats["documents"] = stats.get("documents", 0) + 1
                ids = sp.encode(doc)
                stats["tokens"] = stats.get("tokens", 0) + len(ids) + 2
                yield ids
        items, columns = documents(files, fmt, text_docs), PRETRAIN_COLUMNS
        make_samples = lambda docs: ({"input_ids": s} for s in pack(counted(docs), seq_length, bos, eos))  # noqa: E731
    else:
        items, columns = conversations(files, fmt), SFT_COLUMNS
        make_samples = lambda examples: ({"input_ids": i, "labels": l} for i, l in  # noqa: E731
                                         sft_samples(examples, sp.encode, seq_length, bos, eos, PAD_ID, stats))
    tagged_columns, _ = with_domain(columns, (), domain)
    tagged = lambda part: with_domain(columns, make_samples(part), domain)[1]  # noqa: E731
    if heldout_output:
        count = _write_split(output, heldout_output, tagged_columns, tagged, items, heldout_fraction, overwrite,
                             stats)
    else:
        count = write_mindrecord(output, tagged_columns, tagged(items), overwrite)
    stats["samples"] = count
    return count
