"""The `wsclip` subcommands, one module per area; `wsclip.cli.build_parser` registers them.

Each job is a pair: `_add_<job>(sub)` declares its flags, `_run_<job>(args)` calls the stage
(imports happen there, so `wsclip --help` stays fast). Flags map 1:1 onto the job's config
dataclass; the training jobs generate theirs from the dataclass fields (`wsclip.config.add_config_args`).
"""

from __future__ import annotations


def group(sub, name, help):
    """Nested subparsers of the command group `name` (`wsclip train <what>`), created on first use."""
    if name in sub.choices:
        return sub.choices[name]._wsclip_subparsers
    p = sub.add_parser(name, help=help)
    p.set_defaults(group_parser=p)
    p._wsclip_subparsers = p.add_subparsers(dest=f"{name}_command", metavar="<what>")
    return p._wsclip_subparsers


def compat_arg(p):
    """--compat: wsclip's defaults or every behaviour of the public code (wsclip.compat, docs/compat.md)."""
    p.add_argument("--compat", choices=("wsclip", "official"), default="wsclip",
                   help="official: every behaviour of the public code (docs/compat.md); default wsclip's")
