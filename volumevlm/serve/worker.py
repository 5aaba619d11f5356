"""The model's one thread: jobs from concurrent requests, run in batches.

Request handlers read and preprocess their uploads elsewhere (THE reader and THE
pipeline's :func:`~volumevlm.inference.pipeline.prepare`) and :meth:`BatchWorker.submit`
a job; the worker thread, the only one that touches the model, takes the oldest job,
waits up to ``max_wait_s`` for more jobs of the same verb, and runs up to ``max_batch``
of them at once:

* zero_shot / phenotypes with the option ``anatomy``: the same batch also goes through the
  segmentation head, and each answer is read in the organs it finds (the anatomy head).
* embed / zero_shot / phenotypes / retrieve: the preprocessed volumes are stacked into one
  ``[B, 1, X, Y, Z]`` batch and go through the image encoder in ONE forward pass
  (``model.encode_image`` / ``model.phenotype_logits``); each job's answer is made from its
  row (zero-shot with the pipeline's prompt set and scorer, each prompt text embedded
  once and remembered; retrieval through :meth:`RetrievalIndex.query`).
* retrieve_text: the query texts go through ``model.encode_text`` together (in an anatomy
  index read as reports, :func:`volumevlm.inference.index.query_text_vectors`).
* segment: each preprocessed volume goes through the segmentation head
  (:func:`volumevlm.models.segmentation.segment_probabilities`); the class probabilities
  come back on the preprocessed grid, and the request's reading thread takes them to the
  input's geometry (:func:`~volumevlm.models.segmentation.probabilities_to_input`), as
  ``model.segment`` does. Reading, preprocessing and inversion never hold the model's
  thread.

If a batch fails as a whole, its jobs are run one by one, so one bad input answers with
its own error and the others still succeed. The queue is bounded: :meth:`submit` raises
:class:`QueueFull` instead of waiting. A job whose request gave up (timeout) before the
worker reached it is skipped.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import torch

ENCODER_VERBS = ("embed", "zero_shot", "phenotypes", "retrieve")
VERBS = (*ENCODER_VERBS, "retrieve_text", "segment")
_STOP = object()


class QueueFull(Exception):
    """The worker's queue holds ``queue_size`` jobs already."""


@dataclass
class Job:
    verb: str
    payload: Any  # a preprocessed [1, X, Y, Z] tensor or a text
    options: dict[str, Any]
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    enqueued: float = field(default_factory=time.monotonic)


class BatchWorker:
    """Owns ``model`` on one thread; see the module docstring.

    model: a loaded VolumeVLM (on its device, in eval mode).
    max_batch: most jobs per forward pass. max_wait_s: how long the oldest job waits for
    company. queue_size: most jobs waiting. index: an opened RetrievalIndex or None.
    prompt_set: the zero-shot PromptSet (default: the checkpoint's own).
    """

    def __init__(self, model, *, max_batch: int = 8, max_wait_s: float = 0.005, queue_size: int = 64,
                 index=None, prompt_set=None):
        from volumevlm.inference.pipeline import default_prompt_set

        self.model = model
        self.max_batch = max(1, int(max_batch))
        self.max_wait_s = max(0.0, float(max_wait_s))
        self.index = index
        self.prompt_set = prompt_set if prompt_set is not None else default_prompt_set(model)
        self.prompts = PromptEmbeddings(model)
        self.jobs: queue.Queue = queue.Queue(maxsize=max(1, int(queue_size)))
        self._held: deque[Job] = deque()  # taken off the queue, waiting for a batch of their verb
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._batches = 0
        self._jobs_run = 0
        self._sizes: Counter[int] = Counter()
        self._per_verb: Counter[str] = Counter()
        self._busy_s = 0.0

    # ------------------------------------------------------------------ life

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="volumevlm-model", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is None:
            return
        while True:  # the stop mark must get in even when the queue is full
            try:
                self.jobs.put(_STOP, timeout=0.1)
                break
            except queue.Full:
                if not self._thread.is_alive():
                    break
        self._thread.join(timeout)
        self._thread = None

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, verb: str, payload: Any, **options: Any) -> concurrent.futures.Future:
        """Queue a job; its Future resolves to the verb's result (or its exception)."""
        if verb not in VERBS:
            raise ValueError(f"unknown verb {verb!r}")
        job = Job(verb, payload, options)
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull() from None
        return job.future

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "batches": self._batches,
                "jobs": self._jobs_run,
                "largest_batch": max(self._sizes) if self._sizes else 0,
                "batch_sizes": {str(size): n for size, n in sorted(self._sizes.items())},
                "jobs_per_verb": dict(self._per_verb),
                "busy_s": round(self._busy_s, 3),
                "queued": self.jobs.qsize() + len(self._held),
                "max_batch": self.max_batch,
                "max_wait_ms": self.max_wait_s * 1000.0,
            }

    # ------------------------------------------------------------------ the thread

    def _next_batch(self) -> list[Job] | None:
        """The oldest job and up to max_batch - 1 more of its verb (None: stop)."""
        if not self._held:
            first = self.jobs.get()
            if first is _STOP:
                return None
            self._held.append(first)
        verb = self._held[0].verb
        deadline = time.monotonic() + self.max_wait_s
        while sum(job.verb == verb for job in self._held) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                job = self.jobs.get(timeout=remaining) if remaining > 0 else self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is _STOP:
                self.jobs.put(_STOP)  # seen again after this batch
                break
            self._held.append(job)
        batch = [job for job in self._held if job.verb == verb][: self.max_batch]
        for job in batch:
            self._held.remove(job)
        return batch

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                for job in self._held:
                    job.future.cancel()
                return
            # Jobs whose request already gave up are dropped here, unrun.
            batch = [job for job in batch if job.future.set_running_or_notify_cancel()]
            if not batch:
                continue
            started = time.monotonic()
            results = self._run_safely(batch)
            for job, result in zip(batch, results):
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)
            with self._lock:
                self._batches += 1
                self._jobs_run += len(batch)
                self._sizes[len(batch)] += 1
                self._per_verb[batch[0].verb] += len(batch)
                self._busy_s += time.monotonic() - started

    def _run_safely(self, batch: list[Job]) -> list[Any]:
        try:
            return run_batch(self.model, batch, index=self.index, prompt_set=self.prompt_set, prompts=self.prompts)
        except Exception as err:  # noqa: BLE001 - answered per job below
            if isinstance(err, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()  # the one-by-one retry below may then fit
            if len(batch) == 1:
                return [err]
        # One input spoiled the batch: each job alone, so only it gets the error.
        out: list[Any] = []
        for job in batch:
            try:
                out.extend(run_batch(self.model, [job], index=self.index, prompt_set=self.prompt_set, prompts=self.prompts))
            except Exception as err:  # noqa: BLE001 - the job's own answer
                out.append(err)
        return out


# ---------------------------------------------------------------------- the verbs


def _stack(jobs: list[Job], device) -> torch.Tensor:
    images = [job.payload.as_tensor() if hasattr(job.payload, "as_tensor") else job.payload for job in jobs]
    return torch.stack(images).to(device=device, dtype=torch.float32)


def _groups(jobs: list[Job], key) -> dict[Any, list[int]]:
    """Positions of the jobs, grouped by ``key(job)`` (first-seen order)."""
    groups: dict[Any, list[int]] = {}
    for position, job in enumerate(jobs):
        groups.setdefault(key(job), []).append(position)
    return groups


def run_batch(model, jobs: list[Job], *, index=None, prompt_set=None, prompts: PromptEmbeddings | None = None) -> list[Any]:
    """The results of jobs of ONE verb, in order (see the module docstring). prompts: the
    worker's remembered prompt embeddings (None: embedded afresh)."""
    from volumevlm.inference.pipeline import inference_mode

    verb = jobs[0].verb
    if verb == "zero_shot":
        from volumevlm.inference.pipeline import default_prompt_set

        prompt_set = prompt_set if prompt_set is not None else default_prompt_set(model)
        prompts = prompts if prompts is not None else PromptEmbeddings(model)
    if verb == "segment":
        from volumevlm.models.segmentation import segment_probabilities

        net = model.head("segmentation")
        return [segment_probabilities(net, job.payload) for job in jobs]
    if verb == "retrieve_text":
        from volumevlm.inference.index import query_text_vectors

        with inference_mode(model):
            emb = query_text_vectors(model, [job.payload for job in jobs], index.space)
        return _retrieve(index, emb, jobs)

    # Volumes of one preprocessed shape go through the encoder together (and, read organ by
    # organ, through the segmentation head too).
    results: list[Any] = [None] * len(jobs)
    for (_, anatomy), positions in _groups(jobs, lambda job: (tuple(job.payload.shape),
                                                               bool(job.options.get("anatomy")))).items():
        group = [jobs[p] for p in positions]
        x = _stack(group, model.device)
        with inference_mode(model):
            if anatomy:
                answers = _organ_by_organ(model, verb, x, group, prompt_set, index)
            elif verb == "phenotypes":
                answers = _phenotypes(model, model.phenotype_logits(x).float().cpu(), group)
            else:
                emb = model.encode_image(x).float()
                if verb == "embed":
                    answers = [row.tolist() for row in emb.cpu()]
                elif verb == "zero_shot":
                    answers = _zero_shot(model, emb.cpu(), group, prompt_set, prompts)
                else:
                    answers = _retrieve(index, emb, group)
        for p, answer in zip(positions, answers):
            results[p] = answer
    return results


class PromptEmbeddings:
    """``model.encode_text`` with memory: the prompt texts of a prompt set are the same
    for every request, so each is embedded once, not once per batch. Bounded: past
    ``max_texts`` (requests may name findings of their own) the memory starts over."""

    def __init__(self, model, max_texts: int = 4096):
        self.model = model
        self.max_texts = max_texts
        self.rows: dict[str, torch.Tensor] = {}

    def __call__(self, texts: list[str]) -> torch.Tensor:
        from volumevlm.inference.pipeline import inference_mode

        missing = [t for t in dict.fromkeys(texts) if t not in self.rows]
        if missing:
            if len(self.rows) + len(missing) > self.max_texts:
                self.rows.clear()
            with inference_mode(self.model):
                emb = self.model.encode_text(missing).float().cpu()
            self.rows.update(zip(missing, emb))
        return torch.stack([self.rows[t] for t in texts])


def _zero_shot(model, emb: torch.Tensor, jobs: list[Job], prompt_set, prompts: PromptEmbeddings) -> list[dict[str, float]]:
    """What :func:`volumevlm.inference.pipeline.zero_shot_from_embeddings` computes (the
    same prompt set, findings and scorer), with the prompt embeddings remembered."""
    from volumevlm.inference.pipeline import inference_mode, with_findings
    from volumevlm.text.prompts import zero_shot_probabilities

    answers: list[Any] = [None] * len(jobs)
    for findings, positions in _groups(jobs, lambda job: job.options.get("findings")).items():
        scored_set, keys, names = with_findings(prompt_set, list(findings) if findings else None)
        with inference_mode(model):
            probs = zero_shot_probabilities(emb[positions], prompts, scored_set, keys, logit_scale=model.scale())
        for p, row in zip(positions, probs.float().cpu()):
            answers[p] = {name: float(v) for name, v in zip(names, row.tolist())}
    return answers


def _organ_by_organ(model, verb: str, x: torch.Tensor, jobs: list[Job], prompt_set, index=None) -> list[Any]:
    """zero_shot / phenotypes read in the organs the model segments (the anatomy head):
    what :func:`volumevlm.inference.pipeline.zero_shot` and ``phenotypes`` compute with
    ``anatomy=True``, and retrieve in an anatomy index, for a batch: one encoder and one
    segmentation pass."""
    from volumevlm.inference.pipeline import organ_pass
    from volumevlm.models.zero_shot import zero_shot_from_sections

    head, segmentation = model.head("anatomy"), model.head("segmentation")
    emb, organs = organ_pass(model, x, segmentation, head.organ_statistics)
    if verb == "phenotypes":
        return _phenotypes(model, head.phenotype_logits(organs).float().cpu(), jobs, codes=head.phecodes)
    emb = emb.float().cpu()
    sections = head(organs).float().cpu()
    if verb == "retrieve":
        from volumevlm.models.anatomy import anatomy_retrieval_vectors

        return _retrieve(index, anatomy_retrieval_vectors(emb, sections), jobs)
    answers: list[Any] = [None] * len(jobs)
    for findings, positions in _groups(jobs, lambda job: job.options.get("findings")).items():
        probs, names, _ = zero_shot_from_sections(model, emb[positions], sections[positions], head, prompt_set,
                                                  list(findings) if findings else None)
        for p, row in zip(positions, probs.float().cpu()):
            answers[p] = {name: float(v) for name, v in zip(names, row.tolist())}
    return answers


def _phenotypes(model, logits: torch.Tensor, jobs: list[Job], codes=None) -> list[list[tuple[str, str, float]]]:
    """(phecode, description, P) most likely first, each job's top_k (None: all); ``codes``:
    the logits' columns (default: the phecode vocabulary's)."""
    from volumevlm.errors import VolumeVLMError

    vocab = model.phecode_vocab
    codes = list(vocab.codes if codes is None else codes)
    answers = []
    for row, job in zip(torch.sigmoid(logits), jobs):
        order = torch.argsort(row, descending=True, stable=True).tolist()
        top_k = job.options.get("top_k")
        if top_k is not None:
            order = order[: int(top_k)]
        hits = []
        for i in order:
            try:
                description = vocab.description(codes[i])
            except VolumeVLMError:
                description = ""
            hits.append((codes[i], description, float(row[i])))
        answers.append(hits)
    return answers


def _retrieve(index, emb: torch.Tensor, jobs: list[Job]) -> list[list[dict[str, Any]]]:
    answers: list[Any] = [None] * len(jobs)
    for (k, kind), positions in _groups(jobs, lambda job: (job.options["k"], job.options["kind"])).items():
        for p, hits in zip(positions, index.query(emb[positions], k, kind)):
            answers[p] = hits
    return answers
