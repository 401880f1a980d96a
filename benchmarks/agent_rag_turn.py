"""The whole agent turn on held-out DSTC11 dialogues, three ways, side by side (embedded SmolLM2-135M + shipped head):

(a) two-model: the LM writes a query -> the teacher `encode`s it -> search -> the LM answers;
(b) native query: the LM writes a query -> the head embeds it from generation's states -> search -> answer;
(c) native search-first: one prefill of the dialogue -> the head on the last user turn -> search -> the answer
    continues the same KV cache (`SearchFirstAgent`);
(d) as (c), with each passage's keys and values computed at index time (`PassageCache`, moved into place by
    rotation): the turn computes only what plain answering would. The passages the run cites are prepared before
    it (timed apart: the index-time cost), and its answers are compared with (c)'s (the same prompt computed
    exactly): what reading each passage without the dialogue before it changes.
(p) plain answering, no retrieval: `generate` on the dialogue alone, the floor every path pays (the reference
    for "computes no more than plain answering would", in time and tokens).
(a) and (b) answer from the query turn's KV cache (`NativeRetriever.answer`), so they too never prefill the
dialogue twice: what differs is the query the LM must write first, and who embeds it.

Each path runs twice: "cold", the turn starts from nothing (the whole dialogue is prefilled in it), and "warm",
the earlier turns are already in the KV cache (`NativeRetriever.prefill(history)`, untimed), as in a running chat
where the agent computed them in earlier turns: only the user's new message and what follows is the turn's.

Per path, each in its own process (so peak RSS is the path's own): time to the first answer token (median,
p90), turn time, base forward calls and tokens computed, peak RSS, and nDCG@10 / R@10 of the search against the
gold documents (top 10 ranked; the top `--k` are the answer's passages), beside the teacher on the dialogue.
Writes benchmarks/results/agent_rag_turn.{json,md,png}. Usage:

    .venv/bin/python benchmarks/agent_rag_turn.py [--head DIR] [--dialogues 40] [--answer-tokens 32] [--threads 2]
        [--dtype float32|bfloat16] [--name agent_rag_turn]
        [--history cold warm]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import DATA, ROOT, describe_machine, fmt, machine_info, publish, pyplot, repo_relative, resolve_head

DATASET = "dstc11_track5_val_reviewdoc"
PATHS = {"a": "(a) two-model: LM query -> teacher", "b": "(b) native: LM query -> head",
         "c": "(c) native search-first: prefill -> head",
         "d": "(d) search-first + passage cache: as (c), passages' KV from index time",
         "p": "(p) plain answering: no retrieval (reference)"}
HISTORY = {"cold": "the whole dialogue computed in the turn", "warm": "earlier turns already in the KV cache"}


def sample(model: Any, n: int) -> tuple[Any, list[Any]]:
    """The dataset and the first `n` test-split dialogues with gold documents (the split the head never saw)."""
    from retrieval_head.evaluation.compare import held_out
    from retrieval_head.retrieval.data import load_dataset_folder

    dataset = load_dataset_folder(DATA / DATASET)
    test = held_out(dataset, model)
    relevant = test.relevant_docs()
    return dataset, [q for q in test.queries if q.id in relevant][:n]


def worker(args: argparse.Namespace) -> None:
    """One path over the dialogues; writes per-dialogue timings, tokens and ranked ids to `args.out`."""
    import torch

    from retrieval_head import RetrievalModel
    from retrieval_head.agent import NativeRetriever
    from retrieval_head.agent.turn import FirstToken, SearchFirstAgent, count_forwards
    from retrieval_head.retrieval.fingerprint import TeacherFingerprint
    from retrieval_head.retrieval.index import DocumentIndex

    torch.set_num_threads(args.threads)
    model = RetrievalModel.from_pretrained(args.head, dtype=getattr(torch, args.dtype)).eval()
    fingerprint = TeacherFingerprint.from_dict(model.config.teacher)
    index = DocumentIndex.load(args.index, expected_teacher=fingerprint)
    dataset, queries = sample(model, args.dialogues + 1)  # the first one warms up, untimed
    documents = {d: dataset.document_text(d) for d in dataset.doc_ids}
    teacher = None
    if args.worker == "a":
        from retrieval_head.io.embedded import load_teacher_by_id

        teacher = load_teacher_by_id(fingerprint.teacher_id, fingerprint.revision)
    query_agent = NativeRetriever(model, index, search_with="query")
    first = SearchFirstAgent(NativeRetriever(model, index), documents, k=args.k, passage_chars=args.passage_chars)
    prepared = None
    if args.worker == "d":
        first, prepared = prepare_passages(first, model, queries, documents, args)
    rows = []
    for i, query in enumerate(queries):
        messages = query.as_messages()
        cache = query_agent.prefill(messages[:-1]) if "warm" in args.history and len(messages) > 1 else None
        history_tokens = len(cache.ids) if cache is not None else 0
        started = time.perf_counter()
        with torch.inference_mode(), count_forwards(model.base_model) as calls:
            if args.worker == "p":
                embedding, first_token_s, answer = None, *plain_answer(model, query_agent, messages, cache, started,
                                                                       args.answer_tokens)
                query_text, fed = None, []
            elif args.worker in ("c", "d"):
                turn = first.turn(messages, max_new_tokens=args.answer_tokens, cache=cache)
                embedding, first_token_s, answer = turn.embedding, turn.timings["first_token_s"], turn.answer
                query_text, fed = None, turn.doc_ids
            else:
                result = query_agent.generate_and_search(messages, k=args.k, max_new_tokens=24, cache=cache)
                query_text = result.query_text
                embedding = result.query_embedding
                if teacher is not None:
                    embedding = torch.as_tensor(teacher.encode(query_text, convert_to_numpy=True))
                    result.hits = query_agent.search(embedding, args.k)[0]
                passages = [documents[h.doc_id][: args.passage_chars] for h in result.hits]
                fed = result.doc_ids
                clock = FirstToken(started)
                answer, _ = query_agent.answer(messages, result, passages, max_new_tokens=args.answer_tokens,
                                               streamer=clock)
                first_token_s = (clock.first or time.perf_counter()) - started
        total_s = time.perf_counter() - started
        ranked = [[]] if embedding is None else index.search(embedding.reshape(1, -1).numpy(), 10)[1]  # untimed
        plain_text = model.tokenizer.apply_chat_template(model.renderer.messages(messages), tokenize=False,
                                                         add_generation_prompt=True)
        plain = len(model.tokenizer(plain_text, add_special_tokens=False)["input_ids"]) - history_tokens
        if i == 0:
            continue
        rows.append({"id": query.id, "first_token_s": first_token_s, "total_s": total_s, "forwards": calls.count,
                     "tokens": calls.tokens, "plain_prompt_tokens": plain, "ranked": ranked[0],
                     "query": query_text, "answer": answer, "grounded": names_a_passage(answer, fed, dataset)})
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(args.out).write_text(json.dumps({"rows": rows, "peak_rss_mib": peak_mib, "prepared": prepared}))


def plain_answer(model: Any, retriever: Any, messages: list[Any], cache: Any, started: float,
                 answer_tokens: int) -> tuple[float, str]:
    """Path (p): greedy `generate` on the dialogue's chat prompt (continuing `cache` where it is a prefix), as an
    LM answers without retrieval; (seconds to the first answer token, the answer)."""
    import torch

    from retrieval_head.agent.turn import FirstToken

    tokenizer = model.tokenizer
    text = tokenizer.apply_chat_template(model.renderer.messages(messages), tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    kwargs: dict[str, Any] = {}
    if cache is not None and retriever.reuse_cache(cache, ids):
        kwargs[retriever.cache_kwarg] = cache.cache
    input_ids = torch.tensor([ids])
    clock = FirstToken(started)
    out = model.base_model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                    max_new_tokens=answer_tokens, pad_token_id=tokenizer.pad_token_id,
                                    streamer=clock, **kwargs)
    first = (clock.first or time.perf_counter()) - started
    return first, tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip()


def names_a_passage(answer: str, fed: list[str], dataset: Any) -> bool:
    """Whether the answer names the entity (the document title: a hotel, a restaurant) of a passage it was fed."""
    titles = {dataset.corpus[d].get("title", "").strip().lower() for d in fed} - {""}
    return any(title in answer.lower() for title in titles)


def prepare_passages(plain: Any, model: Any, queries: list[Any], documents: dict[str, str],
                     args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """Path (d)'s agent, its passage cache filled with every passage the run cites (found by an untimed search-first
    turn per dialogue), and what that index-time work cost; plus what the whole corpus would take."""
    from retrieval_head.agent import PassageCache
    from retrieval_head.agent.turn import SearchFirstAgent

    cited = list(dict.fromkeys(d for q in queries for d in plain.turn(q.as_messages(), max_new_tokens=1).doc_ids))
    passages = PassageCache(model, max_passages=None)
    agent = SearchFirstAgent(plain.retriever, documents, k=args.k, passage_chars=args.passage_chars,
                             passage_cache=passages)
    started = time.perf_counter()
    agent.prepare_passages(cited)
    seconds = time.perf_counter() - started
    entries = passages.states([agent.passage(d) for d in cited])
    kv_bytes = sum(t.numel() * t.element_size() for e in entries for t in (*e.keys, *e.values))
    corpus_tokens = sum(len(model.tokenizer(passages.segment(agent.passage(d)), add_special_tokens=False)["input_ids"])
                        for d in documents)
    per_token = kv_bytes / max(1, passages.computed_tokens)
    return agent, {"passages": len(cited), "tokens": passages.computed_tokens, "seconds": seconds,
                   "kv_mib": kv_bytes / 2**20, "kv_kib_per_token": per_token / 1024, "corpus_documents": len(documents),
                   "corpus_tokens": corpus_tokens, "corpus_kv_gib": corpus_tokens * per_token / 2**30,
                   "corpus_seconds": corpus_tokens * seconds / max(1, passages.computed_tokens)}


def teacher_reference(model: Any, dataset: Any, queries: list[Any], index: Any) -> list[list[str]]:
    """The teacher on the dialogue (history + question, cut from the left to its window): the quality bar."""
    from retrieval_head.evaluation.compare import teacher_texts
    from retrieval_head.io.embedded import load_teacher_by_id

    info = model.config.teacher
    teacher = load_teacher_by_id(info["teacher_id"], info.get("revision"))
    texts, _ = teacher_texts(queries, teacher)
    _, ranked = index.search(teacher.encode(texts, convert_to_numpy=True), 10)
    return ranked


def quality(ranked: list[list[str]], ids: list[str], qrels: Any) -> dict[str, float]:
    from retrieval_head.evaluation.metrics import retrieval_metrics

    return retrieval_metrics(dict(zip(ids, ranked, strict=True)), qrels, recall_at=(10,))


def summarize_path(rows: list[dict[str, Any]], qrels: Any) -> dict[str, Any]:
    def stats(key: str) -> dict[str, float]:
        values = sorted(r[key] for r in rows)
        p90 = statistics.quantiles(values, n=10)[-1] if len(values) >= 2 else values[0]
        return {"median": statistics.median(values), "p90": p90}

    return {
        "first_token_s": stats("first_token_s"), "total_s": stats("total_s"),
        "forwards": statistics.mean(r["forwards"] for r in rows), "tokens": statistics.mean(r["tokens"] for r in rows),
        "plain_prompt_tokens": statistics.mean(r["plain_prompt_tokens"] for r in rows),
        "grounded": statistics.mean(r["grounded"] for r in rows),
        "quality": quality([r["ranked"] for r in rows], [r["id"] for r in rows], qrels) if rows[0]["ranked"] else None,
    }


def markdown(result: dict[str, Any]) -> str:
    runs, ref = result["history"], result["teacher_on_dialogue"]
    lines = [
        "# The whole agent turn: search, then answer (DSTC11 test dialogues)",
        "",
        f"{result['dialogues']} held-out dialogues (after one warm-up), greedy answers of at most "
        f"{result['answer_tokens']} tokens from the top {result['k']} passages; each path in its own process, "
        f"{result['threads']} threads, the LM in {result.get('dtype', 'float32')}. Head: `{result['head']}`. "
        f"Machine: {describe_machine(result['machine'])}. "
        "Cold: the turn computes the whole dialogue. Warm: the earlier turns are already in the KV cache "
        "(`NativeRetriever.prefill`, untimed), as in a running chat; the turn computes the user's new message "
        "and what follows.",
        "",
        "| history | path | first answer token, median (s) | p90 (s) | vs (a) | turn (s) | forward calls "
        "| tokens computed | peak RSS (MiB) | nDCG@10 | R@10 | answer names a fed passage's entity |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for history, p in runs.items():
        a_ttft = p["a"]["first_token_s"]["median"]
        for key, label in PATHS.items():
            if key not in p:
                continue
            s, q = p[key], p[key]["quality"]
            found = (f"{fmt(q['ndcg@10'])} | {fmt(q['recall@10'])} | {100 * s.get('grounded', 0):.0f}%" if q else
                     "— | — | —")
            lines.append(
                f"| {history} | {label} | {fmt(s['first_token_s']['median'], 2)} | {fmt(s['first_token_s']['p90'], 2)} "
                f"| {a_ttft / s['first_token_s']['median']:.1f}x | {fmt(s['total_s']['median'], 2)} | "
                f"{s['forwards']:.1f} | {s['tokens']:.0f} | {s['peak_rss_mib']:.0f} | {found} |")
    lines.append(f"| | teacher on the dialogue (quality reference) | | | | | | | | {fmt(ref['ndcg@10'])} | "
                 f"{fmt(ref['recall@10'])} | |")
    lines.append("")
    for history, p in runs.items():
        c = p["c"]
        lines.append(
            f"- {history}: plain answering without retrieval computes {plain_tokens(p, result):.0f} tokens (the "
            f"{'dialogue' if history == 'cold' else 'new message'} + the answer prompt + up to "
            f"{result['answer_tokens']} answer tokens); (c) computes {c['tokens']:.0f}: that plus the passages and "
            "nothing else (no query written, no token twice"
            + (", and a first turn starts from the chat template's prefix, computed once when the agent is built)"
               if history == "cold" else ")")
            + ". (a) and (b) add the query the LM writes and the instruction asking for it.")
    lines += passage_cache_notes(result)
    if result.get("plot"):
        lines += ["", f"![time to first answer token]({result['plot']})"]
    return "\n".join(lines)


def plain_tokens(paths: dict[str, Any], result: dict[str, Any]) -> float:
    """Tokens plain answering computes: measured by path (p) when it ran, else the prompt + the answer."""
    if "p" in paths:
        return paths["p"]["tokens"]
    return paths["c"]["plain_prompt_tokens"] + result["answer_tokens"] - 1


def agreement(ours: list[str], exact: list[str]) -> tuple[int, float]:
    """How many answers are identical, and the mean share of the exact answer's leading words that match."""
    same, shares = 0, []
    for a, b in zip(ours, exact, strict=True):
        same += a == b
        wa, wb = a.split(), b.split()
        lead = next((i for i, (x, y) in enumerate(zip(wa, wb, strict=False)) if x != y), min(len(wa), len(wb)))
        shares.append(lead / max(1, len(wb)))
    return same, statistics.mean(shares) if shares else 0.0


def passage_cache_notes(result: dict[str, Any]) -> list[str]:
    """Path (d)'s lines: what it computes, how its answers compare with (c)'s, what its passages cost."""
    lines = []
    for history, p in result["history"].items():
        if "d" not in p:
            continue
        d, c = p["d"], p["c"]
        plain = plain_tokens(p, result)
        same, share = agreement(d["answers"], c["answers"])
        verdict = ("the passages cost the turn nothing" if d["tokens"] <= plain + 0.5 else
                   f"{d['tokens'] - plain:.0f} more (passages first seen in the turn, or the answer prompt)")
        lines.append(
            f"- {history}: (d) computes {d['tokens']:.0f} tokens, plain answering ~{plain:.0f}: {verdict}. "
            f"Its answers equal (c)'s in {same} of {len(d['answers'])} dialogues; on average "
            f"{100 * share:.0f}% of (c)'s answer words match from the start (each passage was read without the "
            "dialogue before it).")
        prep = d.get("prepared")
        if prep and history == next(iter(result["history"])):
            lines.append(
                f"- (d)'s index-time work, before the run: {prep['passages']} cited passages ({prep['tokens']} tokens) "
                f"in {prep['seconds']:.1f} s ({1000 * prep['seconds'] / max(1, prep['passages']):.0f} ms a passage), "
                f"{prep['kv_mib']:.0f} MiB of keys and values ({prep['kv_kib_per_token']:.0f} KiB a token in "
                f"{result.get('dtype', 'float32')}). The whole corpus ({prep['corpus_documents']} documents, "
                f"{prep['corpus_tokens']} tokens) would be ~{prep['corpus_kv_gib']:.1f} GiB and "
                f"~{prep['corpus_seconds'] / 60:.0f} min here: cache the passages an agent cites (an LRU in memory, "
                "`PassageCache(max_passages=...)`), not every document.")
    return lines


def plot(result: dict[str, Any], path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    runs = result["history"]
    fig, ax = plt.subplots(figsize=(8, 3.4))
    labels = [PATHS[k].split(":")[0] for k in PATHS]
    height = 0.8 / len(runs)
    for i, (history, p) in enumerate(runs.items()):
        ax.barh([y + i * height for y in range(len(PATHS))], [p[k]["first_token_s"]["median"] for k in PATHS],
                height=height, label=HISTORY[history], color=["#69c", "#36a"][i % 2])
    ax.set_yticks([y + height * (len(runs) - 1) / 2 for y in range(len(PATHS))], labels)
    ax.invert_yaxis()
    ax.legend(fontsize=8)
    ax.set_xlabel("time to the first answer token, median (s)")
    ax.set_title("One agent turn with retrieval (SmolLM2-135M, 2 CPU cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head", default=None, help="Head folder (default: the shipped head).")
    parser.add_argument("--dialogues", type=int, default=40)
    parser.add_argument("--answer-tokens", type=int, default=32)
    parser.add_argument("--k", type=int, default=3, help="Passages fed to the answer.")
    parser.add_argument("--passage-chars", type=int, default=400)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="The LM's precision, the same in every path (bfloat16: where the CPU runs it natively).")
    parser.add_argument("--name", default="agent_rag_turn", help="Result file stem (default: %(default)s).")
    parser.add_argument("--index", default=str(ROOT / ".cache" / "indexes" / DATASET),
                        help="The teacher's index of the corpus (built by benchmarks/quality.py or `eval`).")
    parser.add_argument("--history", nargs="+", choices=sorted(HISTORY), default=list(HISTORY),
                        help="cold: the turn prefills the whole dialogue; warm: earlier turns are cached already")
    parser.add_argument("--worker", choices=sorted(PATHS), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.head = resolve_head(args.head)
    if args.worker:
        return worker(args)

    import torch

    from retrieval_head import RetrievalModel
    from retrieval_head.retrieval.fingerprint import TeacherFingerprint
    from retrieval_head.retrieval.index import META_FILE, DocumentIndex

    torch.set_num_threads(args.threads)
    model = RetrievalModel.from_pretrained(args.head).eval()
    dataset, queries = sample(model, args.dialogues + 1)
    queries = queries[1:]
    if not (Path(args.index) / META_FILE).is_file():
        raise SystemExit(f"error: no index in {args.index}; run benchmarks/quality.py first (it builds it)")
    index = DocumentIndex.load(args.index, expected_teacher=TeacherFingerprint.from_dict(model.config.teacher))
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for history in args.history:
            for key in PATHS:
                out = Path(tmp) / f"{key}-{history}.json"
                command = [sys.executable, __file__, "--worker", key, "--history", history, "--out", str(out),
                           "--head", args.head, "--dialogues", str(args.dialogues), "--answer-tokens",
                           str(args.answer_tokens), "--k", str(args.k), "--passage-chars", str(args.passage_chars),
                           "--threads", str(args.threads), "--index", args.index, "--dtype", args.dtype]
                print(f"path {key}, {history} ...", file=sys.stderr, flush=True)
                subprocess.run(command, check=True)
                data = json.loads(out.read_text())
                runs.setdefault(history, {})[key] = {**summarize_path(data["rows"], dataset.qrels),
                                                     "peak_rss_mib": data["peak_rss_mib"],
                                                     "prepared": data.get("prepared"),
                                                     "answers": [r["answer"] for r in data["rows"]],
                                                     "examples": data["rows"][:3]}
    reference = quality(teacher_reference(model, dataset, queries, index), [q.id for q in queries], dataset.qrels)
    result = {"benchmark": "agent_rag_turn", "machine": machine_info(), "head": repo_relative(args.head),
              "dataset": DATASET, "dialogues": len(queries), "answer_tokens": args.answer_tokens, "k": args.k,
              "passage_chars": args.passage_chars, "threads": args.threads, "dtype": args.dtype, "history": runs,
              "teacher_on_dialogue": reference}
    publish(args.name, result, markdown, plot)


if __name__ == "__main__":
    sys.exit(main())
