"""The `berth` command line. It only builds settings or requests and calls the library."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from berth.client.credentials import credentials_path
from berth.client.http import BerthClient, BerthClientError

app = typer.Typer(help="Berth: serve MLflow models behind Databricks-compatible endpoints.", no_args_is_help=True)
endpoints_app = typer.Typer(help="Manage serving endpoints on a running server.", no_args_is_help=True)
app.add_typer(endpoints_app, name="endpoints")
users_app = typer.Typer(help="Manage users (admins only).", no_args_is_help=True)
app.add_typer(users_app, name="users")
principals_app = typer.Typer(help="Manage service principals and their OAuth secrets (admins only).",
                             no_args_is_help=True)
app.add_typer(principals_app, name="principals")
SCIM = "/api/2.0/preview/scim/v2"
console = Console()
err_console = Console(stderr=True)

HostOpt = Annotated[str | None, typer.Option("--host", envvar="BERTH_HOST", help="Server URL.")]
TokenOpt = Annotated[str | None, typer.Option("--token", envvar="BERTH_TOKEN", help="Bearer token.")]
BindHost = Annotated[str | None, typer.Option("--host", help="Interface to listen on [env BERTH_BIND_HOST].")]
Port = Annotated[int | None, typer.Option("--port", help="Port to listen on (0: any free port) [env BERTH_PORT].")]
DataDir = Annotated[Path | None, typer.Option("--data-dir", help="State directory [env BERTH_DATA_DIR].")]
StoreUrl = Annotated[str | None, typer.Option("--store-url", help="SQLAlchemy URL [env BERTH_STORE_URL].")]
GatewayWorkers = Annotated[int | None, typer.Option(
    "--gateway-workers", help="Gateway processes on this port (0: one per 8 cores) [env BERTH_GATEWAY_WORKERS].")]
RedisUrl = Annotated[str | None, typer.Option(
    "--redis-url", help="Share rate limits with other gateway hosts through this Redis [env BERTH_REDIS_URL].")]


def _settings(host: str | None, port: int | None, data_dir: Path | None, store_url: str | None = None,  # type: ignore[no-untyped-def]
              gateway_workers: int | None = None, redis_url: str | None = None):
    from berth.settings import Settings

    return Settings.from_env(bind_host=host, port=port, data_dir=data_dir, store_url=store_url,
                             gateway_workers=gateway_workers, redis_url=redis_url)


def _print_token(token: Any) -> None:
    if token.generated:
        console.print(f"Admin token (shown once, saved to {credentials_path()}):", markup=False)
        console.print(f"  {token.token}", soft_wrap=True, markup=False, highlight=False)
    else:
        console.print(f"Admin token: the one in {credentials_path()} (or BERTH_ADMIN_TOKEN).", markup=False)


def _example_body(model_dir: Path | None) -> str:
    if model_dir is not None:
        example = model_dir / "serving_input_example.json"
        if example.is_file():
            try:
                return json.dumps(json.loads(example.read_text()), separators=(",", ":"))
            except ValueError:
                pass
    return '{"dataframe_split": {"columns": ["x"], "data": [[1.0]]}}'


@app.command()
def serve(
    model_uri: Annotated[str, typer.Argument(
        help="MLflow model directory or file:// URI; or models:/name/version, models:/name@alias, runs:/… "
             "through BERTH_MLFLOW_TRACKING_URI.")],
    name: Annotated[
        str | None, typer.Option("--name", help="Endpoint name (default: the model directory's name).")
    ] = None,
    host: BindHost = None,
    port: Port = None,
    data_dir: DataDir = None,
) -> None:
    """Start the platform and serve one model from it: prints the URL, a token and a curl line."""
    from berth.control.spec import default_entity_name, sanitize_name
    from berth.errors import BerthError
    from berth.registry.sources import is_local
    from berth.server import run_platform

    if is_local(model_uri) or ":" not in model_uri:
        model_dir = _local_model_dir(model_uri)
        local: Path | None = model_dir
        source, endpoint_name = str(model_dir), name or sanitize_name(model_dir.name)
    else:  # models:/…, runs:/…, an artifact URI: resolved through BERTH_MLFLOW_TRACKING_URI
        local, source = None, model_uri
        try:
            endpoint_name = name or default_entity_name(model_uri, None)
        except BerthError as exc:
            err_console.print(f"Cannot serve {model_uri}: {exc.message}", style="red", markup=False)
            raise typer.Exit(2) from exc
    settings = _settings(host, port, data_dir)
    entity = {"name": endpoint_name, "entity_name": source, "workload_size": "Small"}

    async def on_ready(platform: Any, url: str, token: Any) -> None:
        service = platform.service
        try:
            try:
                current = service.get(endpoint_name)
                entities = current.get("config", {}).get("served_entities", [])
                if [e.get("entity_name") for e in entities] != [source]:
                    await service.update_config(endpoint_name, {"served_entities": [entity]})
            except BerthError as exc:
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                await service.create({"name": endpoint_name, "config": {"served_entities": [entity]}}, creator="admin")
        except BerthError as exc:
            err_console.print(f"Cannot serve {model_uri}: {exc.message}", style="red", markup=False)
            return
        invocations = f"{url}/serving-endpoints/{endpoint_name}/invocations"
        console.print(f"Berth is running at {url} (data in {settings.data_dir})", markup=False)
        _print_token(token)
        console.print(f"Endpoint [bold]{endpoint_name}[/bold] serves {escape(source)}")
        console.print("Query it with:")
        header = f"Authorization: Bearer {token.token}" if token.generated else "Authorization: Bearer $BERTH_TOKEN"
        console.print(
            "  curl -s "
            + " ".join(
                [
                    shlex.quote(invocations),
                    "-H", shlex.quote(header),
                    "-H", shlex.quote("Content-Type: application/json"),
                    "-d", shlex.quote(_example_body(local)),
                ]
            ),
            soft_wrap=True,
            highlight=False,
            markup=False,
        )
        with console.status("Loading the model in its replica…"):
            while True:
                view = service.get(endpoint_name)
                state = view["state"]
                if state["config_update"] != "IN_PROGRESS":
                    break
                await asyncio.sleep(0.1)
        if state["ready"] == "READY":
            console.print(f"[green]Endpoint {endpoint_name} is READY.[/green] Press Ctrl-C to stop.")
        else:
            messages = [
                e["state"]["deployment_state_message"] for e in view.get("config", {}).get("served_entities", [])
            ]
            err_console.print(f"[red]Endpoint {endpoint_name} failed to deploy:[/red]")
            err_console.print("\n".join(messages), markup=False, highlight=False)

    _run(run_platform(settings, on_ready))


@app.command()
def server(host: BindHost = None, port: Port = None, data_dir: DataDir = None, store_url: StoreUrl = None,
           gateway_workers: GatewayWorkers = None, redis_url: RedisUrl = None) -> None:
    """Run the platform as a long-lived service; endpoints come back after a restart."""
    from berth.server import run_platform

    settings = _settings(host, port, data_dir, store_url, gateway_workers, redis_url)

    async def on_ready(platform: Any, url: str, token: Any) -> None:
        processes = settings.gateway_processes
        console.print(f"Berth server listening on {url} (data in {settings.data_dir}; "
                      f"{processes} gateway process{'es' if processes > 1 else ''})", markup=False)
        _print_token(token)

    _run(run_platform(settings, on_ready))


@app.command("demo-model")
def demo_model(path: Annotated[Path, typer.Argument(help="Where to save the model.")] = Path("demo-model")) -> None:
    """Write a small scikit-learn model in MLflow format (for trying Berth)."""
    from berth.demo import make_demo_model

    if path.exists():
        err_console.print(f"{path} already exists; leaving it as it is.")
        raise typer.Exit(0)
    make_demo_model(path)
    console.print(f"Saved a demo model to {path}. Serve it with: berth serve {path}")


@endpoints_app.command("list")
def endpoints_list(host: HostOpt = None, token: TokenOpt = None) -> None:
    """List endpoints."""
    result = _call(host, token, "GET", "")
    for ep in result.get("endpoints", []):
        state = ep.get("state", {})
        typer.echo(f"{ep['name']}\t{state.get('ready')}\t{state.get('config_update')}")  # raw tabs, no wrap


@endpoints_app.command("get")
def endpoints_get(name: str, host: HostOpt = None, token: TokenOpt = None) -> None:
    """Show an endpoint as JSON."""
    _print_json(_call(host, token, "GET", f"/{name}"))


@endpoints_app.command("create")
def endpoints_create(
    name: Annotated[str, typer.Argument(help="Endpoint name.")],
    model_uri: Annotated[str | None, typer.Option("--model-uri", help="Serve this model (one entity).")] = None,
    workload_size: Annotated[str, typer.Option("--workload-size")] = "Small",
    config_json: Annotated[str | None, typer.Option("--config", help="Full config JSON (or @file).")] = None,
    host: HostOpt = None,
    token: TokenOpt = None,
) -> None:
    """Create an endpoint from a model URI or a full Databricks config."""
    config = _config_arg(model_uri, workload_size, config_json)
    _print_json(_call(host, token, "POST", "", {"name": name, "config": config}))


@endpoints_app.command("update")
def endpoints_update(
    name: str,
    model_uri: Annotated[str | None, typer.Option("--model-uri")] = None,
    workload_size: Annotated[str, typer.Option("--workload-size")] = "Small",
    config_json: Annotated[str | None, typer.Option("--config", help="Full config JSON (or @file).")] = None,
    host: HostOpt = None,
    token: TokenOpt = None,
) -> None:
    """Replace an endpoint's config (rolled out in the background)."""
    config = _config_arg(model_uri, workload_size, config_json)
    _print_json(_call(host, token, "PUT", f"/{name}/config", config))


@endpoints_app.command("delete")
def endpoints_delete(name: str, host: HostOpt = None, token: TokenOpt = None) -> None:
    """Delete an endpoint and stop its replicas."""
    _call(host, token, "DELETE", f"/{name}")
    console.print(f"Deleted endpoint {name}.")


@endpoints_app.command("decisions")
def endpoints_decisions(
    name: str,
    served_entity: Annotated[str | None, typer.Option("--served-entity", help="Only this served entity.")] = None,
    limit: Annotated[int, typer.Option("--limit", help="How many of the newest decisions.")] = 20,
    changes: Annotated[bool, typer.Option("--changes", help="Only decisions that changed something.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the decisions as JSON.")] = False,
    host: HostOpt = None,
    token: TokenOpt = None,
) -> None:
    """Show the autoscaler's recent decisions for an endpoint, with their inputs and reasons."""
    query = f"?limit={limit}" + (f"&served_entity_name={served_entity}" if served_entity else "")
    rows = _call(host, token, "GET", f"/{name}/autoscaler/decisions{query}").get("decisions", [])
    if changes:
        rows = [d for d in rows if d["desired"] != d["previous"] or d["concurrency"] != d["previous_concurrency"]]
    if as_json:
        _print_json(rows)
        return
    for d in rows:
        when = time.strftime("%H:%M:%S", time.localtime(d["t"]))
        move = f"{d['previous']}x{d['previous_concurrency']} -> {d['desired']}x{d['concurrency']}"
        typer.echo(f"{when}\t#{d['cycle']}\t{d['served_entity_name']}\t{d['axis']}\t{move}\t{d['reason']}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []})
def simulate(ctx: typer.Context) -> None:
    """Run the trace-driven autoscaling simulator (berth vs HPA, KPA, Ray Serve): tables, CSV and plots.

    Every option goes to the simulator; `berth simulate --help` lists them.
    """
    from berth.simulator.cli import main as simulate_main

    raise typer.Exit(simulate_main(list(ctx.args)))


@app.command()
def query(
    name: str,
    json_body: Annotated[str | None, typer.Option("--json", help="Request body (or @file).")] = None,
    csv_file: Annotated[Path | None, typer.Option("--csv", help="CSV file to send as text/csv.")] = None,
    host: HostOpt = None,
    token: TokenOpt = None,
) -> None:
    """Send one request to an endpoint and print the answer."""
    if (json_body is None) == (csv_file is None):
        err_console.print("Pass exactly one of --json or --csv.")
        raise typer.Exit(2)
    if csv_file is not None:
        content, ctype = csv_file.read_bytes(), "text/csv"
    else:
        content, ctype = _text_arg(json_body).encode(), "application/json"  # type: ignore[arg-type]
    try:
        client = BerthClient(host, token)
        response = client.request(
            "POST", f"/serving-endpoints/{name}/invocations", content=content, headers={"Content-Type": ctype}
        )
    except BerthClientError as exc:
        err_console.print(str(exc), style="red", markup=False, highlight=False)
        raise typer.Exit(1) from exc
    served = response.headers.get("served-model-name")
    if served:
        err_console.print(f"served-model-name: {served}")
    console.print(response.text, markup=False, highlight=False, soft_wrap=True)


@app.command()
def loadtest(
    name: Annotated[str | None, typer.Argument(help="Endpoint to load (or pass --url).")] = None,
    url: Annotated[str | None, typer.Option("--url", help="Load any URL instead (GET unless --body).")] = None,
    concurrency: Annotated[int, typer.Option("--concurrency", "-c", help="Connections (closed loop: in flight).")] = 16,
    rate: Annotated[float | None, typer.Option("--rate", "-r", help="Open loop at this many requests/s.")] = None,
    duration: Annotated[float, typer.Option("--duration", "-d", help="Measured seconds.")] = 10.0,
    warmup: Annotated[float, typer.Option("--warmup", help="Unmeasured seconds first.")] = 0.0,
    body: Annotated[str | None, typer.Option("--body", help="Request JSON (or @file); default: from OpenAPI.")] = None,
    target_qps: Annotated[float | None, typer.Option("--target-qps", help="QPS to size concurrency for.")] = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds before a request counts as failed.")] = 30.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
    host: HostOpt = None,
    token: TokenOpt = None,
) -> None:
    """Load an endpoint at a fixed concurrency or rate; print throughput, latency and a concurrency advice."""
    from berth.client.loadtest import LoadSpec, LoadTestError, build_target, render_result, run_loadtest

    try:
        target = build_target(name, url, host, token, _text_arg(body) if body is not None else None)
        spec = LoadSpec(concurrency=concurrency, rate=rate, duration_s=duration, warmup_s=warmup, timeout_s=timeout)
        result = run_loadtest(target, spec, target_qps=target_qps, progress=not as_json)
    except (LoadTestError, OSError) as exc:
        err_console.print(str(exc), style="red", markup=False, highlight=False)
        raise typer.Exit(1) from exc
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        console.print(render_result(result, explicit_target=target_qps is not None))


def _local_model_dir(model_uri: str) -> Path:
    path = Path(model_uri.removeprefix("file://")).expanduser()
    if not (path / "MLmodel").is_file():
        err_console.print(f"{model_uri} is not an MLflow model directory (no MLmodel file).", style="red", markup=False)
        raise typer.Exit(2)
    return path.resolve()


def _text_arg(value: str) -> str:
    return Path(value[1:]).read_text() if value.startswith("@") else value


def _config_arg(model_uri: str | None, workload_size: str, config_json: str | None) -> dict[str, Any]:
    if (model_uri is None) == (config_json is None):
        err_console.print("Pass exactly one of --model-uri or --config.")
        raise typer.Exit(2)
    if config_json is not None:
        try:
            return json.loads(_text_arg(config_json))  # type: ignore[no-any-return]
        except ValueError as exc:
            err_console.print(f"--config is not valid JSON: {exc}", style="red", markup=False)
            raise typer.Exit(2) from exc
    assert model_uri is not None
    # A path (resolved here, on the client); anything with a scheme as given: file://, models:/, runs:/, s3://
    uri = model_uri if ":" in model_uri else str(Path(model_uri).expanduser().resolve())
    return {"served_entities": [{"entity_name": uri, "workload_size": workload_size}]}


@users_app.command("create")
def users_create(
    name: str,
    token_for: Annotated[bool, typer.Option("--token/--no-token", help="Also make the user a token.")] = True,
    host: HostOpt = None,
    token: TokenOpt = None,
) -> None:
    """Create a user (a userName such as an email address) and, by default, a token for them (shown once)."""
    user = _request(host, token, "POST", f"{SCIM}/Users", {"userName": name})
    console.print(f"User {user['userName']} (id {user['id']}).", markup=False, highlight=False)
    if token_for:
        made = _request(host, token, "POST", "/api/2.0/token-management/on-behalf-of/tokens",
                        {"user_name": name, "comment": "made by berth users create"})
        console.print("Their token (shown once):", markup=False)
        console.print(f"  {made['token_value']}", soft_wrap=True, markup=False, highlight=False)


@users_app.command("list")
def users_list(host: HostOpt = None, token: TokenOpt = None) -> None:
    """One row per user: id, userName, admin."""
    for user in _request(host, token, "GET", f"{SCIM}/Users")["Resources"]:
        admin = "admin" if user.get("roles") else ""
        console.print(f"{user['id']}\t{user['userName']}\t{admin}", markup=False, highlight=False)


@users_app.command("delete")
def users_delete(name: str, host: HostOpt = None, token: TokenOpt = None) -> None:
    """Delete a user with their tokens and grants."""
    found = [u for u in _request(host, token, "GET", f"{SCIM}/Users")["Resources"] if u["userName"] == name]
    if not found:
        err_console.print(f"No user '{name}'.", style="red", markup=False)
        raise typer.Exit(1)
    _request(host, token, "DELETE", f"{SCIM}/Users/{found[0]['id']}")


@principals_app.command("create")
def principals_create(name: str, host: HostOpt = None, token: TokenOpt = None) -> None:
    """Create a service principal; grant it by its application id (`service_principal_name`)."""
    sp = _request(host, token, "POST", f"{SCIM}/ServicePrincipals", {"displayName": name})
    console.print(f"Service principal {sp['displayName']} (id {sp['id']}, application id {sp['applicationId']}).",
                  markup=False, highlight=False)


@principals_app.command("secret")
def principals_secret(name: str, host: HostOpt = None, token: TokenOpt = None) -> None:
    """A new OAuth client secret for the service principal (replaces the old one; shown once)."""
    found = [p for p in _request(host, token, "GET", f"{SCIM}/ServicePrincipals")["Resources"]
             if name in (p["displayName"], p["applicationId"])]
    if not found:
        err_console.print(f"No service principal '{name}'.", style="red", markup=False)
        raise typer.Exit(1)
    sp = found[0]
    made = _request(host, token, "POST", f"/api/2.0/accounts/servicePrincipals/{sp['id']}/credentials/secrets")
    console.print(f"client_id:     {sp['applicationId']}", markup=False, highlight=False)
    console.print(f"client_secret: {made['secret']}  (shown once)", soft_wrap=True, markup=False, highlight=False)


def _request(host: str | None, token: str | None, method: str, path: str, body: Any = None) -> Any:
    try:
        response = BerthClient(host, token).request(method, path, json=body)
    except BerthClientError as exc:
        err_console.print(str(exc), style="red", markup=False, highlight=False)
        raise typer.Exit(1) from exc
    return response.json() if response.content else {}


def _call(host: str | None, token: str | None, method: str, path: str, body: Any = None) -> Any:
    try:
        client = BerthClient(host, token)
        return client.api(method, path, body)
    except BerthClientError as exc:
        err_console.print(str(exc), style="red", markup=False, highlight=False)
        raise typer.Exit(1) from exc


def _print_json(payload: Any) -> None:
    console.print_json(json.dumps(payload))


def _run(coro: Any) -> None:
    import signal

    import uvloop

    # uvicorn shuts down gracefully on SIGTERM, then re-raises it: make that a clean exit.
    from berth.store import StoreError

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        with contextlib.suppress(KeyboardInterrupt):
            uvloop.run(coro)
    except StoreError as exc:  # unreachable database, missing driver, unknown schema: one line, no traceback
        err_console.print(f"berth: {exc}", style="red", markup=False, highlight=False, soft_wrap=True)
        sys.exit(1)
    sys.exit(0)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
