"""Mutation testing of comet.py's delivery core: does the test suite notice a small bug?

    python tests/mutation.py [--budget MINUTES] [--jobs N] [--only NAME] [--list]

Each mutant is one small change to one function of the delivery core (the
polls and their wake-ups, the window, accepting packages, the stores'
transactions and reads): a comparison turned (``<`` to ``<=``, ``==`` to
``!=``, ``in`` to ``not in``), an integer or a slice bound moved by one,
``and`` and ``or`` swapped, a ``not`` dropped, a ``True`` made ``False``, a
``return`` of None, a call statement dropped (a wake, a notify, a commit).
It is written into a copy of the repository in a temporary directory, and a
fast, deterministic selection of the tests (``STAGES``) runs there; the first
failure kills the mutant, and so does a stage that outlasts three times its clean
run.  A
mutant no test kills *survives*: a bug the suite would let through, unless it
is listed in ``EQUIVALENT`` with the reason it changes nothing a client can see,
or in ``KILLED_ELSEWHERE`` with the test outside the selection (one that needs a
database server) that fails on it.

Nothing is written into the repository.  Standard library only, besides pytest
and the tests' own dependencies.  ``--only _Window`` mutates only the functions
whose qualified name contains ``_Window`` (given again, either name); ``--list`` prints the mutants
without running them.  The bisections are swapped too (``bisect_right`` and
``bisect_left``): an off-by-one at a cursor.  The run stops starting mutants when ``--budget``
minutes are spent and says how many were left.
"""

import argparse
import ast
import concurrent.futures
import contextlib
import copy
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# The delivery core: qualified names, every method of a class when the name is a class.
TARGETS = (
    "Comet._poll", "Comet._read", "Comet._accept", "Comet._accept_one", "Comet._delivered",
    "Comet._lingers", "Comet._busy", "Comet._linger", "Comet._pushed", "Comet._wake_pushed",
    "Comet._wake_soon", "Comet._gathered", "Comet._serve_push", "_for_many",
    "_Window", "_Parking", "_Waiter",
    "MemoryStore.transaction", "MemoryStore.read", "MemoryStore.head", "_MemoryTransaction",
    "_SQLStore.transaction", "_SQLStore._join", "_SQLStore._pass", "_SQLStore._commit",
    "_SQLStore._flush", "_SQLStore._forget_claims", "_SQLStore.read", "_SQLStore.tail",
    "_SQLTransaction",
)

# Fast and deterministic: no timing assertion, no database server, no browser; the
# contract on memory and SQLite, the delivery core's own tests first (they fail fastest).
# Stages, each ``(tests, -k expression)``: the delivery core's own tests kill most
# mutants in seconds; only a mutant they let through pays for the rest.
FAST = ("not mysql and not postgresql and not max_allowed_packet and not too_large_for_the_store"
        " and not within_50ms and not fresh_python and not two_server_processes"
        " and not purging_a_backlog and not two_processes_purging")
STAGES = (
    (("tests/test_delivery_core.py",), FAST),
    (("test_comet.py", "tests/test_hardening.py", "tests/test_bounded.py"), FAST),
)

# Mutants that change nothing the suite could see, keyed as the run prints them
# ("function | source line | change"), each with the reason.
EQUIVALENT = {
    "Comet._lingers | return bool(self._pushing) and self.linger > 0 or self._busy() | > -> >=":
        "with linger 0 a poll that parks to linger waits 0 s and answers at once all the same",
    "Comet._lingers | return bool(self._pushing) and self.linger > 0 or self._busy() | 0 -> -1":
        "with linger 0 a poll that parks to linger waits 0 s and answers at once all the same",
    "Comet._lingers | return bool(self._pushing) and self.linger > 0 or self._busy() | and -> or":
        "_linger reads _pushing again under the lock and, with no push in flight, returns"
        " the poll's waiter without waiting: the poll answers at once all the same",
    "Comet._busy | return self.linger_busy > 0 and time.monotonic() - self._gathered_at"
    " < _GATHER_SPAN | < -> <=":
        "the time since the last wake-up of many polls equals _GATHER_SPAN exactly only by a"
        " coincidence of the monotonic clock's floats",
    "Comet._wake_soon | elif parking.threads and self.linger_busy > 0 and _for_many(appended): | > -> >=":
        "with linger_busy 0 _busy is false whatever _gathered_at says: the check only spares"
        " counting the recipients",
    "Comet._wake_soon | elif parking.threads and self.linger_busy > 0 and _for_many(appended): | 0 -> -1":
        "with linger_busy 0 _busy is false whatever _gathered_at says: the check only spares"
        " counting the recipients",
    "Comet._wake_soon | recent, self._gathered_at = now - self._gathered_at < _GATHER_SPAN, now"
    " | < -> <=":
        "the time since the last wake-up of many polls equals _GATHER_SPAN exactly only by a"
        " coincidence of the monotonic clock's floats; either way it gathers or not by then",
    "Comet._gathered | if self._pushing and time.monotonic() - began < self.linger: | < -> <=":
        "the time since the gathering began equals linger exactly only by a coincidence of the"
        " monotonic clock's floats",
    "MemoryStore.read | start = bisect.bisect_right(inbox, (after, math.inf))    # past every row at after"
    " | bisect_right -> bisect_left":
        "no row equals (after, inf): a row's second item is its time, a finite number, so"
        " both bisections find the first row past every row at after",
    "MemoryStore.read | lost = self._lost.get(recipient, 0) > after or after < self._purges[0][0] | 0 -> -1":
        "a cursor's position is digits, never negative: 0 > after and -1 > after are both false",
    "_MemoryTransaction.commit | store._head += 1 | 1 -> 2":
        "positions need only grow in commit order; the memory store keeps no window that"
        " counts on them being contiguous",
    "_SQLStore.transaction | batch.kept += 1 | 1 -> 2":
        "kept is only read as 'some part was kept' (first = not batch.kept)",
    "_SQLStore._join | turn = batch.turn.acquire(timeout=10) | 10 -> 11":
        "a bound on waiting for the turn, not a behaviour: only a part held up 9 to 11 s tells",
    "_SQLStore._join | turn = batch.turn.acquire(timeout=10) | 10 -> 9":
        "a bound on waiting for the turn, not a behaviour: only a part held up 9 to 11 s tells",
    "_SQLStore._commit | if batch.begun and batch.error is None: | and -> or":
        "no batch reaches its commit begun with an error (_break clears begun), and one not"
        " begun holds nothing to write: its flush writes nothing and its commit is a no-op",
    "_SQLStore._commit | clean = batch.error is None or not batch.begun | not dropped":
        "the two differ only for a failed batch, whose connection is gone already"
        " (_break) or was never taken (_begin_part), so nothing is pooled or dropped",
    "_SQLStore._forget_claims | claims = batch.claims[start:start + self._max_variables] | slice upper + 1":
        "a claim at a slice's edge is deleted twice, which is harmless; 1000 values in one"
        " statement are too many only for an SQLite older than 3.32",
    "_SQLStore._flush | return [] | return None":
        "what the flush returns goes to on_commit only when true: None and [] alike tell nothing",
    "_SQLStore.read | head, mark, floor = rows[0][:3] | 0 -> -1":
        "head, mark and floor are the same in every row of the one statement",
    "_SQLStore.read | return head, [row[3:] for row in rows if row[3] is not None], lost | 3 -> 4 #2":
        "a delivery's package ts is NULL exactly when its position is: a package and its"
        " deliveries are stored and purged together",
    "_SQLTransaction.savepoint | self._run(f\"RELEASE SAVEPOINT {name}\") | call dropped":
        "after ROLLBACK TO, a savepoint left open is released by the commit: names never repeat",
    "_SQLTransaction.savepoint | self._run(f\"RELEASE SAVEPOINT {name}\") | call dropped #2":
        "a savepoint left open nests the next ones and is committed with the transaction",
    "_SQLTransaction.savepoint | batch.stamps.difference_update(pending[0] for pending in"
    " batch.pending[marks[0]:]) | slice lower - 1":
        "forgets one stamp too many from the batch's set: a client stamp's claim row still"
        " holds it (claim_stamp finds the conflict), and a fresh stamp is never pushed twice",
    "_SQLTransaction.savepoint | batch.stamps.difference_update(pending[0] for pending in"
    " batch.pending[marks[0]:]) | 0 -> 1 #2":
        "marks[1] <= marks[0]: forgets stamps too many, each still held as above",
    "_SQLTransaction.savepoint | batch.stamps.difference_update(pending[0] for pending in"
    " batch.pending[marks[0]:]) | 0 -> -1 #2":
        "marks[-1] is marks[1]: as the mutant above",
    "_SQLTransaction.claim_stamp | claim = -1 - secrets.randbits(62) | 1 -> 2":
        "any negative provisional position will do: positions handed out are positive",
    "_SQLTransaction.claim_stamp | claim = -1 - secrets.randbits(62) | 1 -> 0":
        "any negative provisional position will do (0 once in 2**62 claims)",
    "_SQLTransaction.claim_stamp | claim = -1 - secrets.randbits(62) | 62 -> 63":
        "any negative provisional position will do, and -2**63 still fits a BIGINT",
    "_SQLTransaction.claim_stamp | claim = -1 - secrets.randbits(62) | 62 -> 61":
        "any negative provisional position will do",
    "_Parking.__init__ | self.wakes = 0                      # wake-ups begun so far: see Comet._poll"
    " | 0 -> 1":
        "the count is only compared with itself a moment later (has a wake-up begun since?):"
        " where it starts changes nothing",
    "_Parking.__init__ | self.wakes = 0                      # wake-ups begun so far: see Comet._poll"
    " | 0 -> -1":
        "the count is only compared with itself a moment later: where it starts changes nothing",
    "_Parking.wake | self.wakes += 1 | 1 -> 2":
        "the count is only compared with itself a moment later: any step but 0 tells a"
        " wake-up began",
    "_Parking.unpark | waiter.relayed = False | False -> True":
        "the waiter has left: nothing reads its flag again (its turn ended before it left)",
    "_Parking.wake | if 4 * len(positions) < len(waiters): | < -> <=":
        "which of two loops finds the recipients among the parked: both find the same polls,"
        " the choice is what it costs",
    "_Parking.wake | if 4 * len(positions) < len(waiters): | 4 -> 5":
        "which of two loops finds the recipients among the parked: both find the same polls",
    "_Parking.wake | if 4 * len(positions) < len(waiters): | 4 -> 3":
        "which of two loops finds the recipients among the parked: both find the same polls",
    "_Window.__init__ | self._let_go_bytes = 0              # what those rows counted | 0 -> 1":
        "one byte more or less before rows let go are cut, against an eighth of max_bytes:"
        " a read never looks at rows let go, cut or not",
    "_Window.__init__ | self._let_go_bytes = 0              # what those rows counted | 0 -> -1":
        "one byte more or less before rows let go are cut: a read never looks at them",
    "_Window.stop | self._let_go_to, self._let_go_bytes = set(), 0 | 0 -> 1":
        "one byte more or less before rows let go are cut: a read never looks at them",
    "_Window.stop | self._let_go_to, self._let_go_bytes = set(), 0 | 0 -> -1":
        "one byte more or less before rows let go are cut: a read never looks at them",
    "_Window.add | kept.append((self.horizon + 1, ts, delivered)) | 1 -> 2":
        "what add returns decides only whom to wake (a position past the poll's cursor): one"
        " more wakes a poll already past it, which reads nothing new and parks again",
    "_Window.read | start = bisect.bisect_right(inbox, (after, math.inf))    # past every row at"
    " after | bisect_right -> bisect_left":
        "no row equals (after, inf): a row's second item is its time, a finite number, so"
        " both bisections find the first row past every row at after",
    "Comet._accept | single = len(packages) == 1         # its transaction is its savepoint | 1 -> 0":
        "a lone package then gets a savepoint of its own inside its transaction: undone and"
        " answered alike (index 0, nothing accepted), at the cost of one savepoint more",
    "Comet._poll | if not match or match[1] != self.store.id or int(match[2]) > _MAX_POSITION:"
    " | > -> >=":
        "a cursor at position 2**63-1 is past any head a store reaches, so it is answered"
        " reset either way (after > head)",
    "Comet._poll | if remaining <= 0 or not waiter.wait(remaining): | <= -> <":
        "at exactly 0 s left, wait(0) does not block and answers whether the poll was woken:"
        " the timeout's answer or one more read, both right",
    "_Parking.park | retry_after=1) | 1 -> 2":
        "Retry-After is a hint of whole seconds, at least 1: 2 keeps the contract too",
    "_Parking.park | retry_after=1) | 1 -> 0":
        "Retry-After is sent as at least 1 second whatever the hint",
    "_Parking.park | retry_after=1) | 1 -> 2 #2":
        "Retry-After is a hint of whole seconds, at least 1: 2 keeps the contract too",
    "_Parking.park | retry_after=1) | 1 -> 0 #2":
        "Retry-After is sent as at least 1 second whatever the hint",
    "_SQLStore.tail | if head <= after: | <= -> <":
        "at head == after the two reads find nothing and the tail answers (head, []) all the same",
    "_MemoryTransaction.commit | delivered = [(recipient, tailored or body) for recipient, tailored in deliveries] | or -> and":
        "the memory store is not shared, so its Comet keeps no window: the bodies it reports"
        " to on_commit are read by nobody (only the recipients, to wake their polls)",
    "_SQLTransaction.savepoint | del batch.claims[marks[1]:] | slice lower + 1":
        "keeps one rolled-back claim in the list: the flush deletes its provisional row, which"
        " the rollback already took away, and a random 62-bit position never names another",
    "_SQLTransaction.savepoint | del batch.claims[marks[1]:] | 1 -> 0":
        "a claim is made only for a package appended next (or its part fails), so at a"
        " savepoint claims never outnumber pending packages: the list keeps rolled-back"
        " claims at most, whose rows the flush deletes in vain",
    "_MemoryTransaction.claim_stamp | return False | return None":
        "its caller only asks whether the stamp was taken: None and False alike say no",
    "_SQLTransaction.claim_stamp | return False | return None":
        "its caller only asks whether the stamp was taken: None and False alike say no",
    "_SQLTransaction.append | batch.stamps.add(stamp) | call dropped":
        "the set only spares a query: a client's stamp is claimed by a row first, and the"
        " second claim in the same transaction finds that row; a server's stamp is new",
}

# Mutants the selection lets through that a test outside it kills (one that needs
# MariaDB or PostgreSQL), keyed as above, each with that test.
KILLED_ELSEWHERE = {
    "_SQLTransaction.add_member | log.error(\"comet: a sender of %d characters is too large for %s\","
    " | call dropped":
        "tests/test_hardening.py::test_a_sender_too_large_for_the_store_is_that_pushs_500_logged"
        "_and_members_stay_readable (MariaDB: no SQLite string is too long for a sender)",
}


# --------------------------------------------------------------------------
# Making mutants
# --------------------------------------------------------------------------

_FLIPS = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt,
          ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In,
          ast.Is: ast.IsNot, ast.IsNot: ast.Is}
_SYMBOLS = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==",
            ast.NotEq: "!=", ast.In: "in", ast.NotIn: "not in", ast.Is: "is", ast.IsNot: "is not"}


def _one(value):
    return ast.Constant(value=1)


def _changes(node):
    """``[(description, mutate)]`` for one node; ``mutate(node)`` changes it in place
    (on a copy of the function) or returns the node to put in its place."""
    found = []
    if isinstance(node, ast.Compare):
        for index, op in enumerate(node.ops):
            flipped = _FLIPS.get(type(op))
            if flipped is not None:
                def mutate(n, index=index, flipped=flipped):
                    n.ops[index] = flipped()
                found.append((f"{_SYMBOLS[type(op)]} -> {_SYMBOLS[flipped]}", mutate))
    elif isinstance(node, ast.BoolOp):
        other = ast.Or if isinstance(node.op, ast.And) else ast.And
        def mutate(n, other=other):
            n.op = other()
        found.append(("and -> or" if other is ast.Or else "or -> and", mutate))
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        found.append(("not dropped", lambda n: n.operand))
    elif isinstance(node, ast.Constant) and type(node.value) is bool:
        found.append((f"{node.value} -> {not node.value}",
                      lambda n: ast.Constant(value=not n.value)))
    elif isinstance(node, ast.Constant) and type(node.value) is int:
        for delta in (1, -1):
            found.append((f"{node.value} -> {node.value + delta}",
                          lambda n, delta=delta: ast.Constant(value=n.value + delta)))
    elif isinstance(node, ast.Slice):
        for name in ("lower", "upper"):
            bound = getattr(node, name)
            if bound is not None and not isinstance(bound, ast.Constant):
                for delta, op in ((1, ast.Add), (-1, ast.Sub)):
                    def mutate(n, name=name, op=op):
                        setattr(n, name, ast.BinOp(left=getattr(n, name), op=op(), right=_one(1)))
                    found.append((f"slice {name} {'+' if delta > 0 else '-'} 1", mutate))
    elif isinstance(node, ast.Attribute) and node.attr in ("bisect_left", "bisect_right"):
        other = "bisect_left" if node.attr == "bisect_right" else "bisect_right"
        def mutate(n, other=other):
            n.attr = other
        found.append((f"{node.attr} -> {other}", mutate))
    elif isinstance(node, ast.Return) and node.value is not None and not (
            isinstance(node.value, ast.Constant) and node.value.value is None):
        def mutate(n):
            n.value = ast.Constant(value=None)
        found.append(("return None", mutate))
    elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
        found.append(("call dropped", lambda n: ast.Pass()))
    return found


def _functions(tree):
    """``(qualified name, node)`` of every function of the delivery core."""
    for top in tree.body:
        if isinstance(top, ast.ClassDef):
            for item in top.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    name = f"{top.name}.{item.name}"
                    if top.name in TARGETS or name in TARGETS:
                        yield name, item


def _walk(node):
    """Every node under ``node`` in source order, docstrings and annotations left out."""
    body = getattr(node, "body", None)
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Expr) and isinstance(child.value, ast.Constant) \
                and isinstance(child.value.value, str) and body and child is body[0]:
            continue                        # a docstring
        if isinstance(child, ast.arguments) or child is getattr(node, "decorator_list", None):
            continue
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and \
                child in node.decorator_list:
            continue
        yield child
        yield from _walk(child)


class Mutant:
    def __init__(self, function, line, original, changed, change, source):
        self.function = function
        self.line = line                    # in comet.py as it is
        self.original = original            # that line's source
        self.changed = changed              # the mutated statement, as ast.unparse writes it
        self.change = change
        self.source = source                # the whole mutated comet.py
        self.key = f"{function} | {original} | {change}"


def mutants(text, only=None):
    """Every mutant of ``text`` (comet.py's source), in source order."""
    tree = ast.parse(text)
    lines = text.splitlines(keepends=True)
    made, seen = [], {}
    for name, function in _functions(tree):
        if only and not any(part in name for part in only):
            continue
        start = (function.decorator_list[0] if function.decorator_list else function).lineno
        indent = " " * function.col_offset
        nodes = list(_walk(function))
        for number, node in enumerate(nodes):
            for change, mutate in _changes(node):
                clone = copy.deepcopy(function)
                target = list(_walk(clone))[number]
                replacement = mutate(target)
                if replacement is not None:
                    _replace(clone, target, replacement)
                try:
                    new = ast.unparse(ast.fix_missing_locations(clone))
                    compile(new, "<mutant>", "exec")
                except (SyntaxError, ValueError):
                    continue
                old_lines = ast.unparse(function).splitlines()
                new_lines = new.splitlines()
                changed = next((b.strip() for a, b in zip(old_lines, new_lines) if a != b),
                               new_lines[-1].strip() if len(new_lines) != len(old_lines) else "")
                if changed == "" and new_lines == old_lines:
                    continue                # the change unparses to the same code
                body = "".join(indent + line + "\n" for line in new.splitlines())
                source = "".join(lines[:start - 1]) + body + "".join(lines[function.end_lineno:])
                original = lines[node.lineno - 1].strip()
                mutant = Mutant(name, node.lineno, original, changed, change, source)
                count = seen.get(mutant.key, 0)
                seen[mutant.key] = count + 1
                if count:
                    mutant.key += f" #{count + 1}"
                made.append(mutant)
    return made


def _replace(root, old, new):
    """Put ``new`` where ``old`` is under ``root``."""
    for parent in ast.walk(root):
        for field, value in ast.iter_fields(parent):
            if value is old:
                setattr(parent, field, new)
                return
            if isinstance(value, list):
                for index, item in enumerate(value):
                    if item is old:
                        value[index] = new
                        return
    raise LookupError("node not found")


# --------------------------------------------------------------------------
# Running the tests against each
# --------------------------------------------------------------------------

def _copy_repository(into):
    def ignore(directory, names):
        return [n for n in names if n in (".git", "__pycache__", ".pytest_cache", "node_modules")]
    shutil.copytree(ROOT, into, ignore=ignore, symlinks=True)


_RUNNING = set()                            # the test runs under way, to stop on an interruption


def _run_tests(root, limits):
    """``"passed"``, ``"failed"`` or ``"timeout"`` of the selection in ``root``, stage by
    stage (the first failing stage ends it), the output of the last stage run and the
    seconds each stage took.  ``limits`` bounds each stage's seconds (None: unbounded)."""
    outcome, text, took = "passed", "", []
    for (stage, select), limit in zip(STAGES, limits):
        tests = [test for test in stage if os.path.exists(os.path.join(root, test.split("::")[0]))]
        if tests:
            began = time.monotonic()
            outcome, text = _run_stage(root, tests, select, limit)
            took.append(time.monotonic() - began)
            if outcome != "passed":
                break
    return outcome, text, took


def _run_stage(root, tests, select, timeout):
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
               "-m", "not outage", "-k", select, *tests]
    process = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, start_new_session=True)
    _RUNNING.add(process)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)      # the tests' server processes too
        process.communicate()
        return "timeout", ""
    finally:
        _RUNNING.discard(process)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    text = output.decode(errors="replace")
    return ("passed" if process.returncode == 0 else "failed"), text


class _Worker:
    """A copy of the repository of its own, whose comet.py each mutant replaces."""

    def __init__(self, base):
        self.root = tempfile.mkdtemp(prefix="comet-mutant-", dir=base)
        os.rmdir(self.root)
        _copy_repository(self.root)

    def run(self, source, limits):
        with open(os.path.join(self.root, "comet.py"), "w", encoding="utf-8") as file:
            file.write(source)
        return _run_tests(self.root, limits)


def _stop_running(*_):
    for process in list(_RUNNING):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    raise SystemExit("interrupted: the test runs under way were stopped")


def main():
    signal.signal(signal.SIGTERM, _stop_running)
    signal.signal(signal.SIGINT, _stop_running)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=30.0, help="minutes (default 30)")
    parser.add_argument("--jobs", type=int, default=3 * (os.cpu_count() or 1),
                        help="mutants tested at once (default three per core: the tests"
                             " mostly wait on polls and timers, not on the processor)")
    parser.add_argument("--only", action="append",
                        help="mutate only functions whose qualified name contains this"
                             " (again for several)")
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="at least this many seconds for one stage of a mutant's tests"
                             " before it counts as killed (else three times the clean run's)")
    parser.add_argument("--key", action="append",
                        help="run only the mutants whose key (as a run prints it) contains this"
                             " (again for several)")
    parser.add_argument("--list", action="store_true", help="print the mutants and stop")
    args = parser.parse_args()

    with open(os.path.join(ROOT, "comet.py"), encoding="utf-8") as file:
        text = file.read()
    made = mutants(text, args.only)
    if args.key:
        made = [mutant for mutant in made if any(key in mutant.key for key in args.key)]
    if args.list:
        for mutant in made:
            print(f"{mutant.function}:{mutant.line}: {mutant.change}: {mutant.changed}")
        print(f"{len(made)} mutants")
        return 0

    started = time.monotonic()
    deadline = started + args.budget * 60
    with tempfile.TemporaryDirectory(prefix="comet-mutation-") as base:
        workers = [_Worker(base) for _ in range(max(1, args.jobs))]
        # comet.py as it is, on every worker at once: the selection must pass under the
        # very load the mutants run under, or a failure would not be the mutant's.
        with concurrent.futures.ThreadPoolExecutor(len(workers)) as pool:
            clean = list(pool.map(lambda worker: worker.run(text, [None] * len(STAGES)), workers))
        for outcome, output, _ in clean:
            if outcome != "passed":
                print(output[-4000:])
                print("the tests fail on comet.py as it is: no mutant can be judged")
                return 2
        took = [max(times[stage] for _, _, times in clean) for stage in range(len(STAGES))]
        print(f"{len(made)} mutants, {len(workers)} at once; the selection takes"
              f" {' + '.join(f'{t:.0f}' for t in took)} s on comet.py as it is", flush=True)
        # A stage that outlasts three times its clean run (a poll that never wakes) kills.
        limits = [max(args.timeout, 3 * t) for t in took]
        free = list(workers)
        results, survived, equivalent, elsewhere, killed, timeouts = {}, [], [], [], 0, 0
        with concurrent.futures.ThreadPoolExecutor(len(workers)) as pool:
            pending, queue = {}, list(made)
            while queue or pending:
                while queue and free and time.monotonic() < deadline:
                    mutant, worker = queue.pop(0), free.pop()
                    pending[pool.submit(worker.run, mutant.source, limits)] = mutant, worker
                if not pending:
                    break
                done, _ = concurrent.futures.wait(pending, return_when="FIRST_COMPLETED")
                for future in done:
                    mutant, worker = pending.pop(future)
                    free.append(worker)
                    outcome, _, _ = future.result()
                    results[mutant.key] = outcome
                    if len(results) % 25 == 0:
                        print(f"... {len(results)} of {len(made)} run,"
                              f" {(time.monotonic() - started) / 60:.1f} minutes", flush=True)
                    if outcome == "failed":
                        killed += 1
                    elif outcome == "timeout":
                        timeouts += 1
                    elif mutant.key in KILLED_ELSEWHERE:
                        elsewhere.append(mutant)
                        print(f"killed by   {mutant.function}:{mutant.line}: {mutant.change}:"
                              f" {mutant.changed}  ({KILLED_ELSEWHERE[mutant.key]})", flush=True)
                    elif mutant.key in EQUIVALENT:
                        equivalent.append(mutant)
                        print(f"equivalent  {mutant.function}:{mutant.line}: {mutant.change}:"
                              f" {mutant.changed}  ({EQUIVALENT[mutant.key]})", flush=True)
                    else:
                        survived.append(mutant)
                        print(f"SURVIVED    {mutant.function}:{mutant.line}: {mutant.change}:"
                              f" {mutant.changed}\n            was: {mutant.original}\n"
                              f"            key: {mutant.key!r}", flush=True)
            left = len(queue)
    minutes = (time.monotonic() - started) / 60
    stale = [] if args.only or args.key else \
        sorted((set(EQUIVALENT) | set(KILLED_ELSEWHERE)) - {m.key for m in made})
    for key in stale:
        print(f"note: EQUIVALENT names no mutant of comet.py as it is now: {key!r}")
    print(f"mutants {len(made)}, run {len(results)}, killed {killed + timeouts}"
          f" (by timeout {timeouts}), killed outside the selection {len(elsewhere)},"
          f" equivalent {len(equivalent)}, survived {len(survived)},"
          f" not run {left}, minutes {minutes:.1f}")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
