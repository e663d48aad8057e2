"""A Jinja sandbox whose renders are bounded in time and memory.

A chat template is code that comes inside a model file. Jinja's
``ImmutableSandboxedEnvironment`` keeps it away from Python's internals, but not
from spending: ``[0] * 10**9``, ``'{:>1000000000}'.format(1)``,
``x | tojson(indent=10**8)`` or ``'x' | center(10**9)`` allocate a gigabyte in one
step, nested ``range(100000)`` loops run for hours, and Jinja evaluates constant
expressions while it compiles. :class:`BoundedSandbox` renders (:func:`render`)
under three limits:

* time: :data:`RENDER_SECONDS` of wall clock, checked at every attribute or item
  lookup, call, operator, filter, ``~``, loop iteration and item of a filter's
  generator; the filters that loop in Python where no check can run (``sort``,
  ``urlize``, ...) take at most :data:`SLOW_FILTER_INPUT` characters or items;
* text: the characters (or list items) a render creates, in total, at most
  :data:`TEXT_BUDGET_FLOOR` plus :data:`TEXT_BUDGET_PER_INPUT_CHAR` per character of
  its input. What can amplify is charged *before* it allocates: sequence ``*``,
  ``+`` of sequences, ``%`` and ``str.format`` widths and precisions, the
  ``center ljust rjust zfill expandtabs replace join translate`` methods,
  ``int.to_bytes``, the ``center indent replace format join batch slice sum wordwrap
  tojson pprint`` filters, and turning a value into text (a list holding a
  thousand references to one long string prints a thousand copies). Every other
  value is charged when it is made, and so is the output;
* integers: at most :data:`MAX_INT_BITS` bits (``10 ** 10 ** 10`` is refused before
  Python starts on it);
* comparing and hashing: Python compares and hashes containers item by item in C,
  following shared references each time, so ``[a, a]`` nested 40 times is a small
  value that takes 2**40 steps to compare with an equal copy. Every value compared or
  hashed (the operands of ``== != < <= > >= in``, of the comparing tests ``eq lt in
  ...`` also inside ``select``/``selectattr``, the keys of a dict literal, a tuple
  subscript, the arguments of a call, the input of ``sort unique min max dictsort
  groupby``) may count at most :data:`MAX_COMPARED_ITEMS` items, nested ones
  included and shared ones each time (:func:`expanded_size`). The check is at the
  consumer, not at the many places a container can be made (literals, ``varargs``,
  ``cycler().items``, filters, ...).

Nothing runs at compile time: the optimizer is off, the intercepted operators
cannot be folded, and every filter takes the render's context. ``lipsum`` is gone
(random text has no place in a prompt, and ``lipsum(10**9)`` loops where no hook
sees it). Going past a limit raises :class:`LimitError`; RecursionError and
MemoryError reach the caller, which maps all three (chat_template.py: TemplateError).
"""

from __future__ import annotations

import contextvars
import inspect
import itertools
import re
import time
import types
from collections import abc

import jinja2
from jinja2 import nodes
from jinja2.filters import make_attrgetter
from jinja2.runtime import LoopContext, Macro, Undefined, markup_join, str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedFormatter
from jinja2.utils import Namespace, _PassArg
from jinja2.visitor import NodeTransformer
from markupsafe import EscapeFormatter, Markup

__all__ = ["BoundedSandbox", "LimitError", "render", "text_size", "expanded_size", "RENDER_SECONDS",
           "SLOW_FILTER_INPUT", "TEXT_BUDGET_FLOOR", "TEXT_BUDGET_PER_INPUT_CHAR", "MAX_INT_BITS",
           "MAX_COMPARED_ITEMS"]

# Real templates are far below these limits: Llama 3.2's template renders each of
# tests/test_chat_template.py's chats in under 5 ms creating under 3,000 characters,
# and a 600-message chat with two tools (600 K characters) in ~20 ms creating ~4
# characters per character of input (tests/test_template_sandbox.py renders the test
# chats with a tenth of every limit, and the long chat within a quarter of them).
RENDER_SECONDS = 2.0
"""Wall clock for one render: ~100x what a long chat takes, and short enough that a
server answers its next request soon after a hostile one."""
TEXT_BUDGET_FLOOR = 4 << 20
"""Characters (or list items) every render may create, whatever its input: 4 Mi
(at most 16 MiB of str, 32 MiB of list slots), ~1,000x what a short chat uses."""
TEXT_BUDGET_PER_INPUT_CHAR = 16
"""More characters per character of input (messages, tools, extra variables): 4x what
Llama 3.2's template uses on a long chat."""
SLOW_FILTER_INPUT = 100_000
"""Characters or items that the filters looping in Python where no hook sees may take
(sort, unique, min, max, dictsort, groupby, urlize, striptags, title, wordwrap): each then ends
within ~0.5 s. Chat templates sort a few tools; none urlizes a prompt."""
MAX_INT_BITS = 8192
"""Bits of any integer a template makes (2,467 digits): no prompt needs more, and
arithmetic on such numbers takes microseconds."""
MAX_COMPARED_ITEMS = 1 << 20
"""Items (nested ones included, a shared one each time it is reached) of a value a
template compares or hashes: Python does ~10^7 such steps a second or more, so one
comparison ends within ~0.1 s (a sort within log2(n) times that). A chat's messages
count ~5 items each."""
_FORMAT_DIGITS = 18
"""Digits of a format width or precision beyond which it cannot be a real one."""
_TICK_EVERY = 4096
"""Values counted by text_size between two looks at the clock."""
_MAX_TEXT_DEPTH = 1000
"""Nesting text_size follows: Python's repr() and json.dumps give up near here anyway
(RecursionError), and a value that contains itself stops here."""
_END = object()


class LimitError(Exception):
    """A render went past a limit of this module (the message says which). Not a
    ValueError on purpose: Jinja's ``int`` and ``float`` filters swallow those."""


class _Budget:
    """What one render may still spend."""

    def __init__(self, chars: int, seconds: float):
        self.chars = chars
        self.left = chars
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise LimitError(f"rendering took longer than {self.seconds:g} s")

    def charge(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise LimitError(f"the template creates more than {self.chars:,} characters "
                             f"(a step of {n:,})")

    def made(self, value):
        """Charge a value once it exists (its length; nothing for scalars)."""
        if isinstance(value, (str, bytes, bytearray, list, tuple, dict, set, frozenset)):
            self.charge(len(value))
        elif isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
            raise LimitError(f"an integer of more than {MAX_INT_BITS} bits")
        return value

    def text(self, value) -> None:
        """Charge turning `value` into text (nothing for a str: str(s) is s)."""
        if not isinstance(value, str):
            self.charge(text_size(value, cap=self.left + 1))


_CURRENT: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("llamacpu_template_budget",
                                                                         default=None)


def _budget() -> _Budget:
    budget = _CURRENT.get()
    if budget is None:  # Jinja folding a constant while compiling: leave it to the render
        raise LimitError("bounded operations run only inside render()")
    return budget


def _tick() -> None:
    budget = _CURRENT.get()
    if budget is not None:
        budget.tick()


def text_size(value, cap: int | None = None, per_item: int = 2, per_level: int = 0) -> int:
    """About how many characters `value` becomes as text (str(), repr() or JSON):
    strings by length, numbers by digits, containers by their items plus `per_item`
    for each (separators) and `per_level` per level of nesting of each (JSON
    indentation). Shared references count each time, as printing them does; counting
    stops past `cap`. Walks depth first with one iterator per level, so its memory
    is the nesting depth, never the number of items."""
    n = 0
    seen = 0
    stack = [(iter((value,)), 0)]
    while stack:
        items, depth = stack[-1]
        v = next(items, _END)
        if v is _END:
            stack.pop()
            continue
        seen += 1
        if seen % _TICK_EVERY == 0:
            _tick()
        if isinstance(v, Namespace):
            v = v._Namespace__attrs
        children = None
        if isinstance(v, (str, bytes, bytearray)):
            n += len(v) + 2  # quotes
        elif isinstance(v, int):
            n += v.bit_length() // 3 + 2
        elif isinstance(v, abc.Mapping):
            children = itertools.chain.from_iterable(v.items())
        elif isinstance(v, abc.ItemsView):
            children = itertools.chain.from_iterable(v)
        elif isinstance(v, (list, tuple, abc.Set, abc.KeysView, abc.ValuesView)):
            children = iter(v)
        elif not isinstance(v, Undefined):  # floats, None, functions, loop objects: a short repr
            n += 24
        if children is not None:
            n += 2 + len(v) * (per_item + (depth + 1) * per_level)
        if cap is not None and n > cap:
            break
        if children is not None:
            if depth >= _MAX_TEXT_DEPTH:
                raise LimitError(f"a value nested deeper than {_MAX_TEXT_DEPTH} levels")
            stack.append((children, depth + 1))
    return n


_LEAVES = frozenset({str, int, float, bool, type(None), Markup})


def _container_items(v):
    """The items Python compares or hashes in `v`, or None for a leaf (strings,
    numbers, and what compares by identity: namespaces, loops, functions)."""
    t = type(v)
    if t in _LEAVES:
        return None
    if t is list or t is tuple:
        return iter(v)
    if t is dict:
        return itertools.chain.from_iterable(v.items())
    if isinstance(v, (str, bytes, bytearray)):
        return None
    if isinstance(v, abc.Mapping):
        return itertools.chain.from_iterable(v.items())
    if isinstance(v, abc.ItemsView):
        return itertools.chain.from_iterable(v)
    if isinstance(v, (list, tuple, abc.Set, abc.KeysView, abc.ValuesView)):
        return iter(v)
    return None


def expanded_size(value, cap: int | None = None) -> int:
    """The items in `value`, nested ones included and a shared one each time it is
    reached: the steps Python may take to compare `value` with an equal copy or to
    hash it. Each distinct container is walked once (a memo by id, valid while
    `value` holds them all), so ``[a, a]`` nested 40 times costs 80 steps to find
    2**41; counting stops past `cap`."""
    items = _container_items(value)
    if items is None:
        return 0
    if type(value) in (list, tuple) and not any(type(v) not in _LEAVES for v in value):
        return len(value)  # flat: the common case, without a step per item
    memo: dict[int, int] = {}
    stack = [[value, items, 0]]  # a container, its items left, its count so far
    steps = 0
    while stack:
        frame = stack[-1]
        v = next(frame[1], _END)
        if v is _END:
            stack.pop()
            memo[id(frame[0])] = frame[2]
            if not stack:
                return frame[2]
            stack[-1][2] += frame[2]
            if cap is not None and stack[-1][2] > cap:
                return stack[-1][2]
            continue
        steps += 1
        if steps % _TICK_EVERY == 0:
            _tick()
        frame[2] += 1
        if type(v) in _LEAVES:
            continue
        known = memo.get(id(v))
        if known is not None:
            frame[2] += known
        else:
            children = _container_items(v)
            if children is not None:
                if len(stack) >= _MAX_TEXT_DEPTH:
                    raise LimitError(f"a value nested deeper than {_MAX_TEXT_DEPTH} levels")
                stack.append([v, children, 0])
        if cap is not None and frame[2] > cap:
            return frame[2]
    return 0  # not reached


def _check_compared(value, what: str = "a compared or hashed value"):
    """`value`, refused if comparing or hashing it may take more than
    MAX_COMPARED_ITEMS steps."""
    if _container_items(value) is not None and expanded_size(value, MAX_COMPARED_ITEMS) > MAX_COMPARED_ITEMS:
        raise LimitError(f"{what} of more than {MAX_COMPARED_ITEMS:,} items (nested and shared ones "
                         f"counted each time)")
    return value


# ----------------------------------------------------------------------------- amplifiers

def _is_seq(x) -> bool:
    return isinstance(x, (str, bytes, bytearray, list, tuple))


def _check_int_bits(bits: int) -> None:
    if bits > MAX_INT_BITS:
        raise LimitError(f"an integer of more than {MAX_INT_BITS} bits")


def _check_repeat(budget: _Budget, left, right) -> None:
    """``seq * n``, ``n * seq``, ``int * int``."""
    for seq, n in ((left, right), (right, left)):
        if _is_seq(seq) and isinstance(n, int):
            budget.charge(len(seq) * max(n, 0))
            return
    if isinstance(left, int) and isinstance(right, int):
        _check_int_bits(left.bit_length() + right.bit_length())


def _check_power(left, right) -> None:
    if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
        _check_int_bits(left.bit_length() * right)


def _width(digits: str) -> int:
    if len(digits) > _FORMAT_DIGITS:
        raise LimitError(f"a format width or precision of {len(digits)} digits")
    return int(digits)


def _percent_widths(fmt: str) -> int:
    """The sum of the widths and precisions in a %-format string, parsed as CPython
    does: ``%[(key)][flags][width][.precision][length]type``."""
    total, n = 0, len(fmt)
    i = fmt.find("%")
    while i != -1:
        i += 1
        if i < n and fmt[i] == "(":  # a mapping key, parentheses nest
            depth, i = 1, i + 1
            while i < n and depth:
                depth += {"(": 1, ")": -1}.get(fmt[i], 0)
                i += 1
        while i < n and fmt[i] in "-+ #0":
            i += 1
        for part in ("width", "precision"):
            if part == "precision":
                if i >= n or fmt[i] != ".":
                    break
                i += 1
            if i < n and fmt[i] == "*":
                raise LimitError("a %-format width or precision taken from the arguments ('*')")
            j = i
            while j < n and "0" <= fmt[j] <= "9":
                j += 1
            if j > i:
                total += _width(fmt[i:j])
            i = j
        if i < n and fmt[i] in "hlL":
            i += 1
        i = fmt.find("%", i + 1)  # past the conversion type (which may be '%')
    return total


def _check_percent(budget: _Budget, fmt: str, args) -> None:
    budget.charge(len(fmt) + _percent_widths(fmt) + text_size(args, cap=budget.left + 1))


_DIGITS = re.compile(r"[0-9]+")


def _spec_width(spec: str) -> int:
    """Every number in a ``str.format`` spec (fill, width, precision) summed: at least
    the width plus the precision."""
    return sum(_width(d) for d in _DIGITS.findall(spec))


class _LimitedFormatter(SandboxedFormatter):
    """``str.format``: each field is charged its text and its spec's widths first."""

    def get_field(self, field_name, args, kwargs):
        obj, first = super().get_field(field_name, args, kwargs)
        _budget().text(obj)
        return obj, first

    def format_field(self, value, format_spec):
        _budget().charge(_spec_width(format_spec))
        return super().format_field(value, format_spec)


class _LimitedEscapeFormatter(_LimitedFormatter, EscapeFormatter):
    pass


def _arg(args, kwargs, i, name, default):
    return args[i] if len(args) > i else kwargs.get(name, default)


def _check_method(budget: _Budget, obj, args, kwargs):
    """Charge a str/bytes/int method call that can amplify; returns (args, charged)."""
    owner, name = getattr(obj, "__self__", None), getattr(obj, "__name__", "")
    if isinstance(owner, (str, bytes, bytearray)):
        if name in ("center", "ljust", "rjust", "zfill"):
            width = _arg(args, kwargs, 0, "width", 0)
            if isinstance(width, int):
                budget.charge(max(width, len(owner)))
                return args, True
        elif name == "expandtabs":
            size = _arg(args, kwargs, 0, "tabsize", 8)
            if isinstance(size, int):
                tab = "\t" if isinstance(owner, str) else b"\t"
                budget.charge(len(owner) + owner.count(tab) * max(size, 1))
                return args, True
        elif name == "replace" and len(args) >= 2 and _is_seq(args[0]) and _is_seq(args[1]):
            old, new = args[0], args[1]
            count = _arg(args, kwargs, 2, "count", -1)
            hits = owner.count(old)
            if isinstance(count, int) and count >= 0:
                hits = min(hits, count)
            budget.charge(len(owner) + hits * max(len(new) - len(old), 0))
            return args, True
        elif name == "join" and args:
            items = list(args[0])
            budget.charge(len(owner) * len(items) + sum(text_size(x, cap=budget.left + 1) for x in items))
            return (items,) + tuple(args[1:]), True
        elif name == "translate" and args and isinstance(args[0], abc.Mapping):
            longest = max((len(v) for v in args[0].values() if _is_seq(v)), default=1)
            budget.charge(len(owner) * max(longest, 1))
            return args, True
    elif isinstance(owner, int) and name == "to_bytes":
        length = _arg(args, kwargs, 0, "length", 1)
        if isinstance(length, int):
            budget.charge(length)
            return args, True
    return args, False


# ----------------------------------------------------------------------------- filters

# filters that loop in Python where no hook sees: over items (a key function for each;
# sort ~2 us an item), over text (urlize ~5 us a character, title, wordwrap; striptags
# copies the text once per tag)
_SLOW_ITEM_FILTERS = frozenset({"dictsort", "groupby", "max", "min", "sort", "unique"})
_SLOW_TEXT_FILTERS = frozenset({"striptags", "title", "urlize", "wordwrap"})

# filters that turn their input into text: charged the input's text first
_STRINGIFYING = frozenset({"capitalize", "center", "e", "escape", "forceescape", "format", "indent",
                           "lower", "replace", "string", "striptags", "title", "trim", "truncate",
                           "upper", "urlencode", "urlize", "wordcount", "wordwrap", "xmlattr"})


def _filter_center(budget, a, env):
    if isinstance(a["width"], int):
        budget.charge(a["width"])


def _filter_indent(budget, a, env):
    s, width = a["s"], a["width"]
    w = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
    lines = len(s.splitlines()) + 1 if isinstance(s, str) else text_size(s, cap=budget.left + 1)
    budget.charge(lines * max(w, 0))


def _filter_replace(budget, a, env):
    s, old, new, count = str(a["s"]), str(a["old"]), str(a["new"]), a["count"]
    hits = s.count(old)
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    budget.charge(len(s) + hits * max(len(new) - len(old), 0))


def _filter_format(budget, a, env):
    _check_percent(budget, str(a["value"]), (a["args"], a["kwargs"]))


def _materialize(a, key, env):
    """The filter's input as a list (so it can be measured and still used), and the
    values its `attribute` selects."""
    items = a[key] = list(a[key])
    if a.get("attribute") is None:
        return items
    get = make_attrgetter(env, a["attribute"])
    return [get(x) for x in items]


def _filter_join(budget, a, env):
    values = _materialize(a, "value", env)
    budget.charge(len(str(a["d"])) * len(values) + sum(text_size(v, cap=budget.left + 1) for v in values))


def _filter_sum(budget, a, env):
    """Summing sequences makes a new one at each step: charged every step's length."""
    running = len(a["start"]) if _is_seq(a["start"]) else 0
    total = 0
    for v in _materialize(a, "iterable", env):
        if _is_seq(v):
            running += len(v)
            total += running
    budget.charge(total)


def _filter_batch(budget, a, env):
    if a["fill_with"] is not None and isinstance(a["linecount"], int):
        budget.charge(a["linecount"])


def _filter_slice(budget, a, env):
    if isinstance(a["slices"], int):
        budget.charge(a["slices"])  # one list per slice, even when empty


def _filter_wordwrap(budget, a, env):
    wrap = a["wrapstring"] if a["wrapstring"] is not None else env.newline_sequence
    s = str(a["s"])
    budget.charge(len(s) + (len(s) + 1) * len(str(wrap)))


def _filter_tojson(budget, a, env):
    indent, separators = a.get("indent"), a.get("separators")
    level = len(indent) if isinstance(indent, str) else indent if isinstance(indent, int) else 0
    item = 4 if separators is None else sum(len(s) for s in separators if isinstance(s, str))
    budget.charge(text_size(a["value"], cap=budget.left + 1, per_item=item + 1, per_level=max(level, 0)))


def _filter_pprint(budget, a, env):
    budget.charge(text_size(a["value"], cap=budget.left + 1, per_item=3, per_level=1))


_FILTER_CHECKS = {"center": _filter_center, "indent": _filter_indent, "replace": _filter_replace,
                  "format": _filter_format, "join": _filter_join, "sum": _filter_sum,
                  "batch": _filter_batch, "slice": _filter_slice, "wordwrap": _filter_wordwrap,
                  "tojson": _filter_tojson, "pprint": _filter_pprint}


def _check_slow_input(name: str, value):
    """The input of a filter that loops in Python where no hook sees, measured (a
    generator becomes a list on the way) and refused past SLOW_FILTER_INPUT."""
    if name in _SLOW_ITEM_FILTERS:
        if isinstance(value, _LimitedIter) or not isinstance(value, abc.Sized):  # a filter's generator
            value = list(value)
        size = len(value)
        if size <= SLOW_FILTER_INPUT:  # they compare or hash the items
            _check_compared(value, f"the input of the {name} filter")
    else:
        size = len(value) if isinstance(value, str) else text_size(value, cap=SLOW_FILTER_INPUT + 1)
    if size > SLOW_FILTER_INPUT:
        raise LimitError(f"the {name} filter on more than {SLOW_FILTER_INPUT:,} characters or items")
    return value


def _bounded_filter(name: str, f):
    """`f` checked against the render's budget; it takes the context, so Jinja never
    calls it while compiling. A generator it returns looks at the clock at each item
    (``select`` runs its test for each, where no hook sees)."""
    pass_arg = _PassArg.from_obj(f)
    check = _FILTER_CHECKS.get(name)
    stringifies = name in _STRINGIFYING
    slow = name in _SLOW_ITEM_FILTERS or name in _SLOW_TEXT_FILTERS
    if check is not None:  # the filter's parameters after the context it is passed, if any
        params = list(inspect.signature(f).parameters.values())
        if params and params[0].name in ("context", "eval_ctx", "environment"):
            params = params[1:]
        signature = inspect.Signature(params)

    @jinja2.pass_context
    def bounded(context, value, *args, **kwargs):
        budget = _budget()
        budget.tick()
        lead = {_PassArg.context: (context,), _PassArg.eval_context: (context.eval_ctx,),
                _PassArg.environment: (context.environment,)}.get(pass_arg, ())
        if stringifies:
            budget.text(value)
        if slow:
            value = _check_slow_input(name, value)
        if check is None:
            result = budget.made(f(*lead, value, *args, **kwargs))
        else:
            bound = signature.bind(value, *args, **kwargs)
            bound.apply_defaults()
            check(budget, bound.arguments, context.environment)
            result = f(*lead, *bound.args, **bound.kwargs)
        return _LimitedIter(result) if isinstance(result, types.GeneratorType) else result

    return bounded


# tests that compare or hash their operands
_COMPARING_TESTS = frozenset({"==", "!=", "<", "<=", ">", ">=", "eq", "equalto", "ne", "lt", "lessthan", "le",
                              "gt", "greaterthan", "ge", "in"})


def _bounded_test(f):
    """A comparing test whose operands are checked first (a select or selectattr
    runs it for each item, where no hook sees)."""

    def bounded(value, *args):
        _tick()
        _check_compared(value)
        for a in args:
            _check_compared(a)
        return f(value, *args)

    return bounded


def _compared_filter(value):
    """What the rewrite wraps around each operand of a comparison and each key of a
    dict literal (a filter: Jinja calls it directly, not through call())."""
    _tick()
    return _check_compared(value)


@jinja2.pass_eval_context
def _finalize(eval_ctx, value):
    """``{{ value }}``: charge its text before Jinja turns it into a string."""
    _budget().text(value)
    return value


# ----------------------------------------------------------------------------- environment

class _LimitedIter:
    """A loop's iterable, looking at the clock at each iteration."""

    __slots__ = ("_iterable",)

    def __init__(self, iterable):
        self._iterable = iterable

    def __len__(self):  # loop.length; a TypeError makes LoopContext count the items
        return len(self._iterable)

    def __iter__(self):
        budget = _budget()
        for item in self._iterable:
            budget.tick()
            yield item


def _env_call(name: str, args: list, where: nodes.Node) -> nodes.Call:
    return nodes.Call(nodes.EnvironmentAttribute(name), list(args), [], None, None, lineno=where.lineno)


_COMPARED = "_compared"
"""The internal filter checking a compared or hashed value."""


def _compared(node: nodes.Expr) -> nodes.Filter:
    return nodes.Filter(node, _COMPARED, [], [], None, None, lineno=node.lineno)


class _Rewrite(NodeTransformer):
    """Every loop's iterable through ``limited_iter``, every ``~`` through
    ``limited_concat``, every operand of a comparison and key of a dict literal
    through the ``_compared`` check (Jinja compiles them to plain Python that no
    hook sees)."""

    def visit_Compare(self, node):
        node = self.generic_visit(node)
        node.expr = _compared(node.expr)
        for operand in node.ops:
            operand.expr = _compared(operand.expr)
        return node

    def visit_Pair(self, node):
        node = self.generic_visit(node)
        node.key = _compared(node.key)
        return node

    def visit_For(self, node):
        node = self.generic_visit(node)
        node.iter = _env_call("limited_iter", [node.iter], node)
        return node

    def visit_Concat(self, node):
        node = self.generic_visit(node)
        return _env_call("limited_concat", node.nodes, node)


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """An ImmutableSandboxedEnvironment whose renders (:func:`render`) are bounded.
    filters: extra filters (bounded like Jinja's own); options: Environment options."""

    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def __init__(self, *, filters=None, **options):
        super().__init__(optimized=False, finalize=_finalize, **options)
        self.filters.update(filters or {})
        self.filters = {name: _bounded_filter(name, f) for name, f in self.filters.items()}
        self.filters[_COMPARED] = _compared_filter
        self.tests = {name: _bounded_test(f) if name in _COMPARING_TESTS else f for name, f in self.tests.items()}
        del self.globals["lipsum"]

    def _parse(self, source, name, filename):
        tree = _Rewrite().visit(super()._parse(source, name, filename))
        tree.set_environment(self)
        return tree

    def getattr(self, obj, attribute):
        _tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        _tick()
        _check_compared(argument)  # a tuple key is hashed
        return super().getitem(obj, argument)

    def call_binop(self, context, operator, left, right):
        budget = _budget()
        budget.tick()
        if operator == "*":
            _check_repeat(budget, left, right)
        elif operator == "+" and _is_seq(left) and _is_seq(right):
            budget.charge(len(left) + len(right))
        elif operator == "**":
            _check_power(left, right)
        elif operator == "%" and isinstance(left, str):
            _check_percent(budget, left, right)
        result = self.binop_table[operator](left, right)
        if isinstance(result, int):
            _check_int_bits(result.bit_length())
        return result

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (names a template cannot pass)
        budget = _budget()
        budget.tick()
        if isinstance(__obj, LoopContext) and args:  # loop(children) in a recursive loop
            args = (_LimitedIter(args[0]),) + args[1:]
        elif not isinstance(__obj, Macro) and getattr(__obj, "__self__", None) is not __self:
            # a method or function may compare or hash its arguments (list.index,
            # dict.get, dict(pairs), loop.changed): a macro's are compared, if ever,
            # by the comparisons in it
            for a in itertools.chain(args, kwargs.values()):
                _check_compared(a)
            if args and isinstance(getattr(__obj, "__self__", None), (list, tuple)):
                _check_compared(__obj.__self__)  # list.index(x), list.count(x)
        args, charged = _check_method(budget, __obj, args, kwargs)
        result = super().call(__context, __obj, *args, **kwargs)
        return result if charged else budget.made(result)

    def wrap_str_format(self, value):
        if not (isinstance(value, (types.MethodType, types.BuiltinMethodType))
                and value.__name__ in ("format", "format_map") and isinstance(value.__self__, str)):
            return None
        s, is_map = value.__self__, value.__name__ == "format_map"
        formatter = (_LimitedEscapeFormatter(self, escape=s.escape) if isinstance(s, Markup)
                     else _LimitedFormatter(self))

        def format(*args, **kwargs):
            if is_map:
                if kwargs or len(args) != 1:
                    raise TypeError("format_map() takes exactly one positional argument")
                args, kwargs = (), args[0]
            return type(s)(formatter.vformat(s, args, kwargs))

        return format

    def concat(self, parts):
        """Joins a block's output (``{% set %}`` blocks, macros, ``caller()``)."""
        parts = list(parts)
        _budget().charge(sum(map(len, parts)))
        return "".join(parts)

    def limited_iter(self, iterable):
        return _LimitedIter(iterable)

    @jinja2.pass_eval_context
    def limited_concat(self, eval_ctx, *parts):
        budget = _budget()
        for p in parts:
            budget.text(p)
        return (markup_join if eval_ctx.autoescape else str_join)(parts)


def render(template: jinja2.Template, variables: dict) -> str:
    """`template` (compiled by a BoundedSandbox) rendered with `variables`, within
    the limits; raises LimitError past one."""
    input_chars = text_size(variables)
    budget = _Budget(TEXT_BUDGET_FLOOR + TEXT_BUDGET_PER_INPUT_CHAR * input_chars, RENDER_SECONDS)
    token = _CURRENT.set(budget)
    try:
        parts = []
        for chunk in template.generate(**variables):
            budget.charge(len(chunk))
            parts.append(chunk)
        return "".join(parts)
    finally:
        _CURRENT.reset(token)
