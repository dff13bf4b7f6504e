"""How every `zfs-ng` command prints: a plain table for people, JSON with --json,
and one error style (a message on stderr, exit 1) so scripts can rely on both."""

import functools
import json
import sys

import click

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")


def emit(value, as_json, columns=None):
    """Print value: a list of dicts as a table of `columns` (all keys when None),
    a dict as `key: value` lines, anything else as itself."""
    if as_json:
        click.echo(json.dumps(value, indent=2, sort_keys=True))
        return
    if isinstance(value, list):
        click.echo(table(value, columns))
    elif isinstance(value, dict):
        width = max((len(k) for k in value), default=0)
        for k in sorted(value):
            click.echo("%-*s  %s" % (width, k, _cell(value[k])))
    elif value is not None:
        click.echo(value)


def _cell(v):
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True)
    return "-" if v is None else str(v)


def table(rows, columns=None):
    if columns is None:
        columns = sorted({k for r in rows for k in r})
    cells = [[c.upper() for c in columns]] + [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells)


def fail(message):
    """A clear CLI error: message on stderr, exit status 1, no traceback."""
    click.echo("zfs-ng: error: %s" % message, err=True)
    sys.exit(1)


def errors_to_messages(*exc_types):
    """Decorator: turn the given exceptions into fail(str(e))."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*a, **kw):
            try:
                return fn(*a, **kw)
            except exc_types as e:
                fail(str(e))
        return inner
    return wrap
