"""The hybrid prefix-state cache: a radix tree over token ids holding full model-state checkpoints.

A Mamba layer's state is overwritten in place, so unlike a KV cache it cannot be cut back to a
shorter prefix: a request can only resume from a position where the WHOLE state was saved
(every Mamba layer's conv + SSM state, and the attention layers' KV up to there). So this cache
stores checkpoints at chosen positions (Marconi, arXiv 2411.19379, Sec. 4):

- the end of each prompt, and the end of each finished request (prompt + output: the next chat
  turn repeats both);
- every C tokens inside a long prompt;
- the point where a new request's tokens branch off a cached path ("speculative insertion"): the
  tree gains a node there, and the request, which prefills through that point anyway, saves its
  state on the way, so the next request sharing that longer prefix hits it in full.

Eviction under a byte budget ("marconi") scores each checkpoint by recency plus the FLOPs it
saves per byte it holds: the prefill FLOPs between its nearest checkpointed ancestor and itself
(linear layers, plus attention's quadratic term) over its size. Long hybrid checkpoints save many
FLOPs for few bytes (their Mamba state is constant-size); short ones that any longer checkpoint
makes redundant save little. "lru" evicts the least recently used checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from jambalab.cache import HybridCache
from jambalab.serve.cost import PrefillCost


@dataclass
class _Node:
    edge: tuple[int, ...]  # the tokens from the parent to this node
    depth: int  # tokens from the root to the end of this node
    parent: _Node | None = None
    children: dict[int, _Node] = field(default_factory=dict)  # first token of the child's edge -> child
    state: HybridCache | None = None  # the model state after `depth` tokens
    nbytes: int = 0
    last_used: int = 0


class PrefixCache:
    def __init__(self, model, budget_bytes: int, eviction: str = "marconi", alpha: float = 1.0,
                 attention_cost: float = 1.0):
        self.budget, self.eviction, self.alpha = budget_bytes, eviction, alpha
        self._cost = PrefillCost(model, attention_cost)  # what a checkpoint saves, in time-weighted FLOPs
        self.root = _Node((), 0)
        self._clock = 0
        self.lookups = self.hits = self.tokens_reused = self.bytes = self.evictions = self.checkpoints = 0

    # ---- lookup --------------------------------------------------------------------------
    def lookup(self, tokens: list[int], every: int) -> tuple[int, HybridCache | None, list[int]]:
        """The deepest checkpoint that is a prefix of tokens[:-1] (one token must remain to prefill),
        as (its length, its state or None), and the positions the caller's prefill should save:
        the branch point off the cached path and every `every` tokens, past the hit."""
        self.lookups += 1
        self._clock += 1
        best, matched = self.root, 0
        node = self.root
        limit = len(tokens) - 1
        while matched < len(tokens):
            child = node.children.get(tokens[matched])
            if child is None:
                break
            common = _common(child.edge, tokens[matched:])
            matched += common
            if common < len(child.edge):
                break
            node = child
            if child.state is not None and child.depth <= limit:
                best = child
        hit = best.depth if best.state is not None else 0
        marks = {m for m in range(every, len(tokens), every) if m > hit}
        if hit < matched < len(tokens):
            marks.add(matched)  # the branch point
        if best.state is None:
            return 0, None, sorted(marks)
        best.last_used = self._clock
        self.hits += 1
        self.tokens_reused += hit
        return hit, best.state, sorted(marks)

    # ---- insert ----------------------------------------------------------------------------
    def admits(self, tokens: list[int], nbytes: int) -> bool:
        """Whether insert(tokens, a state of nbytes) would store anything (callers skip the copy if not)."""
        if not tokens or nbytes > self.budget:
            return False
        node, i = self.root, 0
        while i < len(tokens):  # an existing checkpoint at exactly these tokens needs no new copy
            child = node.children.get(tokens[i])
            if child is None or _common(child.edge, tokens[i:]) < len(child.edge):
                return True
            node, i = child, i + len(child.edge)
        if node.state is not None:
            self._clock += 1
            node.last_used = self._clock
            return False
        return True

    def insert(self, tokens: list[int], state: HybridCache) -> None:
        """Checkpoint `state` (the model state after all of tokens), then evict down to the budget."""
        if not tokens or state.length != len(tokens):
            return
        size = state.nbytes()
        if size > self.budget:
            return
        self._clock += 1
        node = self._node_at(tuple(tokens))
        node.last_used = self._clock
        if node.state is not None:
            return  # the same tokens give the same state
        node.state, node.nbytes = state, size
        self.bytes += size
        self.checkpoints += 1
        while self.bytes > self.budget:
            self._evict(protect=node)

    def _node_at(self, tokens: tuple[int, ...]) -> _Node:
        """The node ending exactly after `tokens`, splitting an edge or adding a leaf as needed."""
        node, i = self.root, 0
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                leaf = _Node(tokens[i:], len(tokens), node)
                node.children[tokens[i]] = leaf
                return leaf
            common = _common(child.edge, tokens[i:])
            if common < len(child.edge):
                child = self._split(child, common)
            node, i = child, i + common
        return node

    @staticmethod
    def _split(child: _Node, at: int) -> _Node:
        """Cut child's edge after `at` tokens: a new middle node takes the first part."""
        parent = child.parent
        mid = _Node(child.edge[:at], child.depth - len(child.edge) + at, parent)
        parent.children[child.edge[0]] = mid
        child.edge, child.parent = child.edge[at:], mid
        mid.children[child.edge[0]] = child
        return mid

    # ---- eviction ---------------------------------------------------------------------------
    def _evict(self, protect: _Node) -> None:
        held = [n for n in self._nodes() if n.state is not None]
        if len(held) < 2:
            return
        if self.eviction == "lru":
            victim = min((n for n in held if n is not protect), key=lambda n: n.last_used)
        else:
            victim = self._marconi_victim(held, protect)
        self.bytes -= victim.nbytes
        victim.state, victim.nbytes = None, 0
        self.evictions += 1
        self.checkpoints -= 1
        self._prune(victim)

    def _marconi_victim(self, held: list[_Node], protect: _Node) -> _Node:
        """The lowest recency + alpha * (FLOPs saved per byte), each scaled to [0, 1] over every
        checkpoint held (the one just inserted included, though it is never the victim)."""
        clocks = [n.last_used for n in held]
        lo, span = min(clocks), max(max(clocks) - min(clocks), 1)
        eff = [self.flops_saved(n) / max(n.nbytes, 1) for n in held]
        top = max(max(eff), 1e-30)
        scores = {id(n): (n.last_used - lo) / span + self.alpha * e / top for n, e in zip(held, eff)}
        return min((n for n in held if n is not protect), key=lambda n: scores[id(n)])

    def flops_saved(self, node: _Node) -> float:
        """Prefill FLOPs from the nearest checkpointed ancestor (or the start) up to this node."""
        a = node.parent
        while a is not None and a.state is None:
            a = a.parent
        return self._cost(a.depth if a is not None else 0, node.depth)

    def _prune(self, node: _Node) -> None:
        """Drop stateless leaves up the tree, and fold a stateless node with one child into it."""
        while node is not self.root and node.state is None and not node.children:
            parent = node.parent
            del parent.children[node.edge[0]]
            node = parent
        if node is not self.root and node.state is None and len(node.children) == 1:
            (child,) = node.children.values()
            child.edge = node.edge + child.edge
            child.parent = node.parent
            node.parent.children[node.edge[0]] = child

    def _nodes(self) -> list[_Node]:
        out, todo = [], [self.root]
        while todo:
            n = todo.pop()
            out.append(n)
            todo.extend(n.children.values())
        return out

    def stats(self) -> dict[str, int]:
        return dict(prefix_lookups=self.lookups, prefix_hits=self.hits, prefix_tokens_reused=self.tokens_reused,
                    prefix_bytes=self.bytes, prefix_evictions=self.evictions, prefix_checkpoints=self.checkpoints)


def _common(a: tuple[int, ...], b) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
