"""Server counters and their Prometheus text exposition (format 0.0.4).

The engine thread writes (``record_*``); request handlers read (``render``). A lock keeps a
reader from seeing a dict or list while it is being changed.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from bamba.engine import EngineStats

# Upper bounds (seconds) of the time-to-first-token histogram buckets; +Inf is implicit.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RATE_WINDOW = 10.0  # seconds over which tokens/s is averaged


@dataclass
class ServerMetrics:
    """Counters since start, plus the engine's latest pool and queue counts."""

    stats: EngineStats
    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished: dict[str, int] = field(default_factory=dict)
    ttft_buckets: list[int] = field(default_factory=lambda: [0] * len(TTFT_BUCKETS))
    ttft_sum: float = 0.0
    ttft_count: int = 0
    recent: deque[tuple[float, int]] = field(default_factory=deque)  # (time, tokens) a step
    step_seconds: float = 0.0  # engine thread inside steps
    between_steps_seconds: float = 0.0  # engine thread between two steps in a row
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record_first_token(self, seconds: float, prompt_tokens: int) -> None:
        with self.lock:
            index = bisect.bisect_left(TTFT_BUCKETS, seconds)
            if index < len(TTFT_BUCKETS):
                self.ttft_buckets[index] += 1
            self.ttft_sum += seconds
            self.ttft_count += 1
            self.prompt_tokens += prompt_tokens

    def record_step(self, new_tokens: int, stats: EngineStats) -> None:
        now = time.monotonic()
        with self.lock:
            self.generation_tokens += new_tokens
            while self.recent and now - self.recent[0][0] > RATE_WINDOW:
                self.recent.popleft()
            self.recent.append((now, new_tokens))
            self.stats = stats

    def record_engine_time(self, step: float, between: float) -> None:
        """A step's seconds, and those since the step before it when the engine ran them back
        to back (handing outputs to the event loop, taking commands, waiting for the GIL):
        the server's own cost beside the model's."""
        with self.lock:
            self.step_seconds += step
            self.between_steps_seconds += between

    def record_finish(self, reason: str) -> None:
        with self.lock:
            self.finished[reason] = self.finished.get(reason, 0) + 1

    def set_stats(self, stats: EngineStats) -> None:
        with self.lock:
            self.stats = stats

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self.lock:
            return sum(n for t, n in self.recent if now - t <= RATE_WINDOW) / RATE_WINDOW

    def render(self) -> str:
        """Prometheus text exposition of every gauge, counter and the TTFT histogram."""
        rate = self.tokens_per_second()
        with self.lock:
            s = self.stats
            out: list[str] = []
            _gauge(out, "bamba_requests_running", s.num_running, "Requests running.")
            _gauge(out, "bamba_requests_waiting", s.num_waiting, "Requests waiting for memory.")
            _gauge(out, "bamba_kv_blocks_in_use", s.num_blocks - s.num_free_blocks,
                   "KV blocks held by running requests.")
            _gauge(out, "bamba_kv_blocks_cached", s.num_cached_blocks,
                   "Free KV blocks still holding prefix-cache entries.")
            _gauge(out, "bamba_kv_blocks_total", s.num_blocks, "KV blocks in the pool.")
            _gauge(out, "bamba_state_slots_in_use", s.num_slots - s.num_free_slots,
                   "Mamba state slots held by running requests.")
            _gauge(out, "bamba_state_slots_cached", s.num_cached_slots,
                   "Free state slots still holding prefix-cache snapshots.")
            _gauge(out, "bamba_state_slots_total", s.num_slots, "Mamba state slots in the pool.")
            _gauge(out, "bamba_prefix_cache_hit_rate", s.prefix_cache_hit_rate,
                   "Share of prompt tokens served from the prefix cache.")
            _counter(out, "bamba_preemptions_total", s.num_preemptions, "Sequences preempted.")
            _counter(out, "bamba_spec_decode_draft_tokens_total", s.num_draft_tokens,
                     "Prompt-lookup draft tokens checked (--speculative-config).")
            _counter(out, "bamba_spec_decode_accepted_tokens_total", s.num_accepted_draft_tokens,
                     "Draft tokens the model agreed with.")
            _counter(out, "bamba_prompt_tokens_total", self.prompt_tokens,
                     "Prompt tokens of requests that produced a first token.")
            _counter(out, "bamba_generation_tokens_total", self.generation_tokens,
                     "Tokens generated.")
            _counter(out, "bamba_engine_step_seconds_total", self.step_seconds,
                     "Engine thread seconds inside steps.")
            _counter(out, "bamba_engine_between_steps_seconds_total", self.between_steps_seconds,
                     "Engine thread seconds between back-to-back steps (handing outputs on, "
                     "taking commands).")
            _gauge(out, "bamba_generation_tokens_per_second", rate,
                   f"Tokens generated per second over the last {RATE_WINDOW:g} s.")
            _help(out, "bamba_requests_finished_total", "counter", "Finished samples by reason.")
            for reason, count in sorted(self.finished.items()):
                out.append(f'bamba_requests_finished_total{{finish_reason="{reason}"}} {count}')
            self._render_ttft(out)
        return "\n".join(out) + "\n"

    def _render_ttft(self, out: list[str]) -> None:
        name = "bamba_time_to_first_token_seconds"
        _help(out, name, "histogram", "Time from arrival to the first generated token.")
        total = 0
        for bound, count in zip(TTFT_BUCKETS, self.ttft_buckets, strict=True):
            total += count
            out.append(f'{name}_bucket{{le="{bound:g}"}} {total}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.ttft_count}')
        out.append(f"{name}_sum {self.ttft_sum:.6f}")
        out.append(f"{name}_count {self.ttft_count}")


def _help(out: list[str], name: str, kind: str, text: str) -> None:
    out.extend([f"# HELP {name} {text}", f"# TYPE {name} {kind}"])


def _gauge(out: list[str], name: str, value: float, text: str) -> None:
    _help(out, name, "gauge", text)
    out.append(f"{name} {_number(value)}")


def _counter(out: list[str], name: str, value: float, text: str) -> None:
    _help(out, name, "counter", text)
    out.append(f"{name} {_number(value)}")


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else repr(float(value))
