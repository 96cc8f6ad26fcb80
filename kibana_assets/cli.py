"""`openai-assets`: install, export, validate and uninstall openai-elastic's ES/Kibana assets."""
from __future__ import annotations

import re
import sys

import click

from agent_input.cli import StdoutSafeGroup
from agent_input.config import namespace_problem

from . import elasticsearch as E
from . import kibana as K
from . import installer as I
from . import queries as Q
from .validate import validate_bundle

_DURATION = re.compile(r"^([0-9]+)(d|h|m)$")  # ASCII digits: Python's \d also takes "３０"
MAX_WINDOW_MINUTES = 365 * 1440
MAX_RETENTION_DAYS = 36500  # --retention, --rate-limits-retention: 100 years


def _minutes(text: str, name: str) -> int:
    m = _DURATION.match(text.strip())
    if not m:
        raise click.BadParameter(f"{text!r} is not a duration like 30m, 2h or 1d", param_hint=name)
    n, unit = int(m.group(1)), m.group(2)
    if n == 0:  # a zero look-back or staleness window would make a rule that never (or always) fires
        raise click.BadParameter(f"{text!r} must be longer than 0", param_hint=name)
    minutes = n * {"m": 1, "h": 60, "d": 1440}[unit]
    if minutes > MAX_WINDOW_MINUTES:  # a rule's `NOW() - N minutes` and time window past any data
        raise click.BadParameter(f"{text!r} is longer than 365d", param_hint=name)
    return minutes


def _retention(param: click.Parameter, value: str) -> str:
    name = param.opts[0]
    if not re.fullmatch(r"[0-9]+(d|h)", value):  # sent as typed: Elasticsearch reads ASCII digits
        raise click.BadParameter(f"{value!r} is not a retention like 90d", param_hint=name)
    if int(value[:-1]) == 0:  # data stream lifecycle could delete each document as it lands
        raise click.BadParameter(f"{value!r} must be longer than 0", param_hint=name)
    if int(value[:-1]) * (1 if value.endswith("h") else 24) > MAX_RETENTION_DAYS * 24:
        # Elasticsearch reads data_retention as a count of its unit in a Java long: 20 digits made
        # every template write fail at install time (or a bundle no cluster loads), and any retention
        # this long is a typo, not a plan
        raise click.BadParameter(f"{value[:30]!r} is longer than {MAX_RETENTION_DAYS}d (100 years)", param_hint=name)
    return value


def _namespace(ctx, param, value: str) -> str:
    """The collector's rule for `namespace`: Elasticsearch's reroute would otherwise rewrite it."""
    problem = namespace_problem(value)
    if problem:
        raise click.BadParameter(problem, param_hint="--namespace")
    return value


_SPACE_ID = re.compile(r"[a-z0-9_-]+")


def _space(ctx, param, value: str | None) -> str | None:
    """Kibana space ids are a-z, 0-9, _ and -, and Kibana routes /s/<id>/ only for those: a space's
    name (`Marketing`) sent as is gets a 404, or worse a prefix of it taken as the space."""
    if value is not None and not _SPACE_ID.fullmatch(value):
        raise click.BadParameter(f"{value!r} is not a Kibana space id: ids use only a-z, 0-9, _ and - "
                                 "(the id in the space's URL, /s/<id>/, not its name)", param_hint="--space")
    return value


def _kibana_version(ctx, param, value: str | None) -> str | None:
    if value is not None:
        try:
            K.parse_version(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--kibana-version") from None
        try:  # the versions install refuses: the bundle would fail there at import
            I.check_version("Kibana", value)
        except I.InstallerError as exc:
            raise click.BadParameter(str(exc), param_hint="--kibana-version") from None
    return value


def _options(f):
    opts = [
        click.option("--es-url", envvar="ES_URL", help="Elasticsearch URL (or ES_URL)."),
        click.option("--kibana-url", envvar="KIBANA_URL", help="Kibana URL (or KIBANA_URL)."),
        click.option("--api-key-file", type=click.Path(dir_okay=False),
                     help="File holding an Elasticsearch API key (else ELASTIC_API_KEY)."),
        click.option("--username", help="Basic-auth user (else ELASTIC_USERNAME)."),
        click.option("--password-file", type=click.Path(dir_okay=False),
                     help="File holding the password (else ELASTIC_PASSWORD)."),
        click.option("--space", default=None, callback=_space,
                     help="Kibana space id (as in /s/<id>/) for the data view, dashboards and rules."),
        click.option("--namespace", default="default", show_default=True, callback=_namespace,
                     help="Namespace the router sends documents to when they carry none."),
        click.option("--ca-cert", type=click.Path(exists=True, dir_okay=False), help="CA bundle for TLS."),
        click.option("--insecure", is_flag=True, help="Skip TLS verification (test clusters only)."),
        click.option("--skip-kibana", is_flag=True, help="Only the Elasticsearch assets."),
        click.option("--dry-run", is_flag=True, help="Print the plan; write nothing."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _finite(ctx, param, value: float) -> float:
    """FloatRange lets `nan` through (no comparison with it is true): the rules would then hold
    `WHERE tpm_utilization >= nan`, an unknown column, and fail at every run."""
    if value != value:
        raise click.BadParameter(f"{value!r} is not a number", param_hint="--headroom-threshold")
    return value


def _rule_options(f):
    opts = [
        click.option("--retention", "retention", default=E.DEFAULT_RETENTION_ALL, show_default=True,
                     callback=lambda c, p, v: _retention(p, v),
                     help="Data stream lifecycle retention for every dataset but rate_limits."),
        click.option("--rate-limits-retention", default=E.DEFAULT_RETENTION["rate_limits"], show_default=True,
                     callback=lambda c, p, v: _retention(p, v), help="Retention for openai.rate_limits."),
        click.option("--ilm-policy", default=None,
                     help="Use this existing ILM policy instead of data stream lifecycle retention."),
        click.option("--headroom-threshold", type=click.FloatRange(0, 10), default=0.8, show_default=True,
                     callback=_finite, help="Utilization at which the headroom rules fire."),
        click.option("--headroom-window", default=f"{Q.DEFAULT_USAGE_WINDOW_MINUTES}m", show_default=True,
                     help="Usage look-back of the headroom rules (the limits look back --stale-after + 10m). "
                          "The seed's 15m plus up to 6m before a minute is collected and 1m of margin, so one "
                          "breaching minute is seen by the 3 runs the alert delay needs; add the usage "
                          "streams' finalization grace when they have one."),
        click.option("--stale-after", default="1h", show_default=True,
                     help="Alert when no rate-limits collection succeeded, or one project's limits could "
                          "not be read, for this long (make it at least twice the rate_limits "
                          "interval). The headroom rules use the last known limits for this long plus 10m."),
        click.option("--stale-horizon", default=None,
                     help="The stale alert stops once the last rate-limits collection is older than "
                          "this (a stream turned off); longer than --stale-after. "
                          "[default: --stale-after + 24h]"),
        click.option("--rules-disabled", is_flag=True, help="Create the rules disabled."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _rule_opts(kw: dict) -> K.RuleOptions:
    stale_after = _minutes(kw["stale_after"], "--stale-after")
    horizon = _minutes(kw["stale_horizon"], "--stale-horizon") if kw.get("stale_horizon") else None
    if horizon is not None and horizon <= stale_after:
        raise click.BadParameter(f"{kw['stale_horizon']!r} must be longer than --stale-after "
                                 f"({kw['stale_after']!r})", param_hint="--stale-horizon")
    options = K.RuleOptions(
        headroom_threshold=kw["headroom_threshold"],
        headroom_window_minutes=_minutes(kw["headroom_window"], "--headroom-window"),
        stale_after_minutes=stale_after,
        stale_horizon_minutes=horizon,
        enabled=not kw["rules_disabled"],
    )
    # the windows derived from --stale-after (its +24h horizon, its +10m limits look-back) keep
    # to the same bound as the options themselves
    derived = max(options.stale_window_minutes, options.limits_lookback_minutes)
    if derived > MAX_WINDOW_MINUTES:
        raise click.BadParameter(f"{kw['stale_after']!r} makes the rules' time window longer than 365d "
                                 f"(--stale-after + {'10m' if horizon else '24h, the default --stale-horizon'})",
                                 param_hint="--stale-after")
    return options


def _build_options(kw: dict) -> I.Options:
    """Options from the command line; without the rule options (uninstall, which needs only the
    assets' names), their defaults."""
    if "retention" not in kw:
        return I.Options(namespace=kw.get("namespace") or "default", with_kibana=not kw.get("skip_kibana", False))
    per_ds = dict(E.DEFAULT_RETENTION)
    per_ds["rate_limits"] = kw["rate_limits_retention"]
    return I.Options(
        retention=E.Retention(default=kw["retention"], per_dataset=per_ds, ilm_policy=kw["ilm_policy"]),
        namespace=kw.get("namespace") or "default",
        rules=_rule_opts(kw),
        with_kibana=not kw.get("skip_kibana", False),
    )


def _target(kw: dict) -> I.Target:
    """Checks the URLs (those that will be used) and the credentials before any request."""
    I.check_url(kw["es_url"], "--es-url")
    if kw["kibana_url"] and not kw["skip_kibana"]:
        I.check_url(kw["kibana_url"], "--kibana-url", "https://localhost:5601")
        I.check_kibana_url(kw["kibana_url"])
    creds = I.resolve_credentials(kw["api_key_file"], kw["username"], kw["password_file"])
    verify: bool | str = True
    if not kw["insecure"] and kw["ca_cert"]:  # --insecure wins: the CA file is not read
        verify = I.ca_bundle(kw["ca_cert"])
    elif kw["insecure"]:
        verify = False
        # urllib3 warns InsecureRequestWarning at every request to an unverified host ("always"
        # for its SecurityWarnings): two raw lines per request. Said once here instead, as the
        # collector says ssl_verify: false once (agent_input.logs.setup_logging).
        import warnings

        from urllib3.exceptions import InsecureRequestWarning

        warnings.filterwarnings("ignore", category=InsecureRequestWarning)
        click.echo("openai-assets: warning: TLS certificate verification is off (--insecure)", err=True)
    return I.Target(kw["es_url"], kw["kibana_url"], creds, space=kw["space"], verify=verify)


def _fail(exc: I.InstallerError) -> None:
    click.echo(f"openai-assets: {exc}", err=True)
    sys.exit(exc.code)


@click.group(cls=StdoutSafeGroup, prog="openai-assets", context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="openai-elastic")
def main() -> None:
    """Install openai-elastic's Elasticsearch and Kibana assets (8.18+ and 9.x)."""


@main.command()
@_options
@_rule_options
@click.option("--replace-foreign-assets", is_flag=True,
              help="Overwrite assets of the same names that another tool manages (e.g. the Elastic OpenAI "
                   "integration's templates). Without it, install refuses and names them.")
def install(replace_foreign_assets: bool, **kw) -> None:
    """Install or upgrade every asset; reports each as created, updated or unchanged."""
    try:
        if not kw["es_url"]:
            raise I.InstallerError("--es-url (or ES_URL) is required", code=2)
        if not kw["kibana_url"] and not kw["skip_kibana"]:
            raise I.InstallerError("--kibana-url (or KIBANA_URL) is required (or pass --skip-kibana)", code=2)
        options = _build_options(kw)
        options.replace_foreign = replace_foreign_assets
        inst = I.Installer(_target(kw), options, dry_run=kw["dry_run"], echo=click.echo)
    except I.InstallerError as exc:
        _fail(exc)
        return
    report = inst.install()
    verb = "dry run" if kw["dry_run"] else "install"
    if report.error is not None:
        click.echo(report.summary(verb), err=True)
        sys.exit(report.error.code)
    click.echo(report.summary(verb))
    if not kw["dry_run"]:
        click.echo(f"ship events to logs-openai.<dataset>-{inst.o.namespace} directly, or to "
                   f"logs-openai-{inst.o.namespace} through the {E.ROUTER_PIPELINE} router")


@main.command()
@_options  # not the rule options: they tune what install writes, not what uninstall removes
@click.option("--delete-data", is_flag=True,
              help="Also delete the logs-openai.* data streams and the logs-openai-* routing ones (irreversible).")
def uninstall(delete_data: bool, **kw) -> None:
    """Remove what install created. Data streams stay unless --delete-data."""
    try:
        if not kw["es_url"]:
            raise I.InstallerError("--es-url (or ES_URL) is required", code=2)
        if not kw["kibana_url"] and not kw["skip_kibana"]:  # its objects are removed first
            raise I.InstallerError("--kibana-url (or KIBANA_URL) is required (or pass --skip-kibana)", code=2)
        inst = I.Installer(_target(kw), _build_options(kw), dry_run=kw["dry_run"], echo=click.echo)
    except I.InstallerError as exc:
        _fail(exc)
        return
    report = inst.uninstall(delete_data=delete_data)
    verb = "dry run" if kw["dry_run"] else "uninstall"
    if report.error is not None:
        click.echo(report.summary(verb), err=True)
        sys.exit(report.error.code)
    click.echo(report.summary(verb))


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--kibana-version", default=None, callback=_kibana_version,
              help="Target Kibana version; rules for 8.18/9.0 get one alert for all rows. Left out: "
                   "rules for 8.19 and 9.1+ (one alert per project and model).")
@click.option("--namespace", default="default", show_default=True, callback=_namespace,
              help="Namespace the router sends documents to when they carry none.")
@click.option("--space", default=None, callback=_space,
              help="Kibana space id the Kibana files are for: that space's ids and /s/<id>/ paths, as install uses.")
@_rule_options
def export(directory: str, kibana_version: str | None, space: str | None, **kw) -> None:
    """Write the bundle as files for air-gapped clusters (JSON + importable NDJSON + rules)."""
    options = _build_options(kw)
    try:
        paths = I.export(directory, options, kibana_version, space)
    except OSError as exc:
        _fail(I.InstallerError(f"cannot write the bundle to {directory}: {exc.strerror or exc}"))
        return
    click.echo(f"wrote {len(paths)} files to {directory} (see {directory}/manifest.json for the install order)")


@main.command()
def validate() -> None:
    """Offline checks: fields, mappings, every ES|QL query parsed with the official grammar."""
    problems, notes = validate_bundle()
    for n in notes:
        click.echo(f"ok  {n}")
    for p in problems:
        click.echo(f"ERR {p}", err=True)
    if problems:
        sys.exit(1)
    click.echo("bundle valid")


if __name__ == "__main__":  # pragma: no cover
    main()
