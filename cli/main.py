"""The `cascade` command line: one entry point over `models` and `services`.

Typer builds the commands; this module runs them with click's standalone mode off so that
every user error (usage errors included) becomes one line on stderr and exit code 2, never a
boxed panel or a traceback.
"""

from __future__ import annotations

import sys

import typer

try:  # recent typer vendors its own click; older releases use the click package
    from typer._click import exceptions as click_errors  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover
    from click import exceptions as click_errors  # type: ignore[no-redef]

from cli.errors import CliError

app = typer.Typer(
    name="cascade",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

USER_ERRORS: tuple[type[BaseException], ...] = (CliError, ValueError, FileNotFoundError,
                                                 NotADirectoryError, PermissionError)


@app.callback()
def _root() -> None:
    """Cascade: multi-stage online ad serving (recall -> screen -> pre-rank -> rank -> auction)."""


@app.command()
def version() -> None:
    """Print the Cascade version and the built-in feature schema's hash."""
    from importlib.metadata import version as dist_version

    from models.features import load_schema

    print(f"cascade {dist_version('cascade-ads')}  schema {load_schema().sha256[:12]}")


COMMAND_MODULES = (
    "cli.commands_data",  # simulate
    "cli.commands_store",  # load-store, import-aliccp
    "cli.commands_models",  # train, eval, funnel
    "cli.commands_serve",  # serve
    "cli.commands_bench",  # bench stages, bench e2e
    "cli.commands_stack",  # stack up|down|status
    "cli.commands_replay",  # replay
)


def _register_commands() -> None:
    """Import the command modules; each adds its commands to `app`."""
    import importlib

    for name in COMMAND_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # a real missing dependency, not a module not yet written
                raise


def _fail(message: str, code: int = 2) -> None:
    line = " ".join(str(message).split())
    print(f"cascade: error: {line}", file=sys.stderr)
    sys.exit(code)


def run(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    _register_commands()
    command = typer.main.get_command(app)
    try:
        rv = command.main(args=argv, prog_name="cascade", standalone_mode=False)
    except click_errors.NoArgsIsHelpError as exc:
        if exc.ctx is not None:
            print(exc.ctx.get_help())
        sys.exit(0)
    except click_errors.UsageError as exc:
        path = exc.ctx.command_path if exc.ctx else "cascade"
        _fail(f"{exc.format_message()} (see '{path} --help')")
    except getattr(click_errors, "Abort", typer.Abort):  # typer 0.29 keeps Abort in typer
        _fail("aborted", 130)
    except click_errors.ClickException as exc:
        _fail(exc.format_message())
    except USER_ERRORS as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except Exception as exc:  # noqa: BLE001 - the contract is one line, never a traceback
        _fail(f"internal error: {type(exc).__name__}: {exc}", 1)
    if isinstance(rv, int) and rv:
        sys.exit(rv)


if __name__ == "__main__":
    # `python -m cli.main` runs this file as __main__; command modules register on the
    # importable `cli.main.app`, so run that module's entry point, not this copy's.
    from cli.main import run as _run

    _run()
