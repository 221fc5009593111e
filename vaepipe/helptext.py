"""How the command line's help reads: well at 80 columns, in typer's plain layout (its Rich tables squeezed the
descriptions into a narrow column, and cost an import before the first line)."""

from __future__ import annotations

import contextlib

import typer
from typer.core import TyperCommand, TyperGroup


class Group(TyperGroup):
    def format_commands(self, ctx: typer.Context, formatter) -> None:
        """Each command with the first paragraph of its help, wrapped rather than cut short."""
        rows = [(name, (command.help or "").split("\n\n")[0].replace("\n", " ")) for name in self.list_commands(ctx)
                if (command := self.get_command(ctx, name)) is not None and not command.hidden]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


class Command(TyperCommand):
    """Help that reads well at 80 columns (typer's plain layout, not its Rich tables): the usage line names the
    arguments as `LATENTS OUTPUT`, and an option's value is named after it (`--vae VAE`, no `<str>`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for param in self.params:
            if param.metavar is None and not getattr(param, "is_flag", False):
                param.metavar = param.name.upper()

    def collect_usage_pieces(self, ctx: typer.Context) -> list[str]:
        return [self.options_metavar, *(p.metavar for p in self.params if p.param_type_name == "argument")]

    def format_options(self, ctx: typer.Context, formatter) -> None:
        arguments, options = [], []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if param.param_type_name == "argument":  # typer writes "LATENTS <path>" and "[required]"
                arguments.append((param.metavar, record[1].removesuffix("[required]").rstrip()))
            else:
                options.append(record)
        for title, rows in (("Arguments", arguments), ("Options", options)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


# Help text wraps between words, never inside one: `--no-cut-audio`, `no-exact` stay whole (typer's vendored click
# builds its wrapper from this module at each call).
with contextlib.suppress(ImportError):
    from typer._click import _textwrap

    class _WholeWords(_textwrap.TextWrapper):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs, break_on_hyphens=False)

    _textwrap.TextWrapper = _WholeWords
