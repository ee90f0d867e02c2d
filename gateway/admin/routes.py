"""HTTP handlers of the admin API (JSON) and the dashboard page."""

from __future__ import annotations

import asyncio
import functools
import json
import re
from importlib import resources
from typing import Any, Awaitable, Callable

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import (HTMLResponse, JSONResponse, PlainTextResponse,
                                 RedirectResponse, Response)
from starlette.routing import BaseRoute, Match, Route

from cache_seed import (SeedCancelled, SeedError, SeedValidationError, TooManyNewAnswers,
                        parse_target_wrong_rate)
from cache_seed.validate import question_problems

from ..http_body import BodyAbandoned, BodyTimeout, BodyTooLarge, closing
from ..protocol import LONE_SURROGATE, has_lone_surrogate
from ..services import Services
from ..stats import MISSED_KEPT
from . import auth
from .auth import admin_only, error
from intents.embedder import normalize_text
from intents.store import PublishUnconfirmed, StoreConflict, StoreError
from intents.types import entry_id_for

from .misses import DEFAULT_THRESHOLD, group_misses, is_agent_intent
from .publish import (BadEntry, EntryExists, EntryNotFound, LabelledValidationError,
                      PublishedNotServed, Publisher, SeedBusy, find_entry, report_json)
from .seed_status import CANCELLING, PROMOTE, PUBLISHED, WRITING

MAX_UPLOAD_BYTES = 5 * 1024 * 1024
MAX_ENTRY_BODY_BYTES = 1024 * 1024  # one entry with its paraphrases, as JSON
# Bad rows an upload's 400 lists: enough to fix a file in one go, while a 5 MB file of bad
# rows (hundreds of thousands) is no 100 MB answer JSON-encoded on the serving loop.
MAX_LISTED_BAD_ROWS = 1000


NOT_READY = "not ready: models are loading (see /readyz)"
DRAINING = ("this replica is shutting down (draining) and starts no seed or edit: send the "
            "request to another replica (the balancer takes this one out of rotation within "
            "about a second); nothing was published")


def _services(request: Request) -> Services:
    return request.app.state.services


def _publisher(request: Request) -> Publisher:
    state = request.app.state
    publisher = getattr(state, "admin_publisher", None)
    if publisher is None:
        publisher = state.admin_publisher = Publisher(_services(request))
    return publisher


Handler = Callable[[Request, Services], Awaitable[Response]]


def admin_ready(handler: Handler | None = None, *, reads_query: bool = False,
                publishes: bool = False) -> Any:
    """An admin data route: the token is checked first, then (unless the handler
    ``reads_query`` and checks its own, as POST /admin/seed and GET /admin/misses do) that
    the request has no query parameter, then that models and the cache are loaded (503
    until then); the handler receives the services. A parameter no route reads
    (`DELETE /admin/entries/x?force=1`, `GET /admin/entries?limit=5`) was ignored: the
    operator believed it took effect; it is refused with 400 naming it, before any work.
    A route that ``publishes`` (a seed, an entry edit or deletion, a promotion) is refused
    with 503 while the replica drains, before its body is read: a seed begun then would
    hold the drain (``Services.held``) up to its timeout and then be cancelled, unpublished."""

    def wrap(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        @admin_only
        @functools.wraps(handler)
        async def route(request: Request) -> Response:
            if not reads_query:
                unread = _unread_params(request, _route_name(request), (), "")
                if unread is not None:
                    return _bad_request(request, unread)
            services = _services(request)
            if not services.ready or services.cache is None:
                return error(NOT_READY, 503, load_error=services.load_error)
            if publishes and services.draining:
                return error(DRAINING, 503, draining=True, version=services.cache.version)
            return await handler(request, services)

        return route

    return wrap if handler is None else wrap(handler)


def _route_name(request: Request) -> str:
    """``METHOD /path`` of the admin route the request matched, as the docs name it
    (``DELETE /admin/entries/{entry_id}``)."""
    path = next((r.path for r in _admin_routes_of(request)
                 if r.matches(request.scope)[0] is Match.FULL), request.url.path)
    return f"{request.method} {path}"


# ---------------------------------------------------------------------- stats


@admin_ready
async def stats(request: Request, services: Services) -> Response:
    return JSONResponse(await _snapshot(services))


async def _snapshot(services: Services) -> dict[str, Any]:
    return await services.stats_snapshot()


# ---------------------------------------------------------------------- entries


def _entry_json(entry: Any, hits: int) -> dict[str, Any]:
    return {"id": entry.id, "intent": entry.intent, "action": entry.action.value,
            "answer": entry.answer, "paraphrases": list(entry.paraphrases), "hits": hits,
            "audio_s": round(len(entry.pcm) / 2 / entry.sample_rate, 3)
            if entry.pcm and entry.sample_rate else None}


async def _entry_hits(services: Services) -> dict[str, int]:
    """Hits per entry as the stats report them (so aggregated wherever the stats are)."""
    return dict((await _snapshot(services)).get("entry_hits") or {})


@admin_ready
async def list_entries(request: Request, services: Services) -> Response:
    loaded = services.cache.loaded  # type: ignore[union-attr]
    hits = await _entry_hits(services)
    entries = [] if loaded is None else [_entry_json(e, hits.get(e.id, 0))
                                         for e in loaded.entries.values()]
    return JSONResponse({"version": loaded.version if loaded else None, "entries": entries})


@admin_ready
async def get_entry(request: Request, services: Services) -> Response:
    entry_id = request.path_params["entry_id"]
    loaded = services.cache.loaded  # type: ignore[union-attr]
    # By its id or its intent name, as DELETE and POST find it (by the id alone it was 404
    # for a name DELETE deleted).
    entry = find_entry(loaded.entries.values(), entry_id,
                       lambda e: (e.id, e.intent)) if loaded else None
    if entry is None:
        return error(f"no entry {entry_id!r} in the serving cache version "
                     f"({loaded.version if loaded else 'none published'})", 404)
    hits = (await _entry_hits(services)).get(entry.id, 0)
    return JSONResponse({"version": loaded.version,  # type: ignore[union-attr]
                         "entry": _entry_json(entry, hits)})


# What a publish that did not happen, or did not take effect here, raises; _publish_failed
# answers each.
_PUBLISH_FAILURES = (LabelledValidationError, SeedBusy, SeedError, StoreError,
                     PublishedNotServed)


def _publish_failed(exc: Exception, services: Services) -> Response:
    """The answer to a publish that did not happen, or that this replica could not load; the
    serving version is untouched."""
    if isinstance(exc, PublishedNotServed):  # published: say so, and what serves here
        return error(str(exc), 500, version=exc.serving, published=exc.report.version,
                     cache_error=exc.cause, report=report_json(exc.report))
    if isinstance(exc, LabelledValidationError):  # a 400: counted as _bad_request counts it
        services.stats.error("admin_bad_request")
        return error(f"{exc}; the serving version is unchanged", 400, errors=exc.errors,
                     version=services.cache.version)  # type: ignore[union-attr]
    if isinstance(exc, SeedBusy):
        return error(str(exc), 409)
    if isinstance(exc, TooManyNewAnswers):  # refused before rendering: a 400, as bad rows are
        services.stats.error("admin_bad_request")
        return error(f"{exc}; the previous version keeps serving", 400,
                     new_answers=exc.new, reused=exc.reused, limit=exc.limit.most,
                     setting=exc.limit.setting,
                     version=services.cache.version)  # type: ignore[union-attr]
    if isinstance(exc, SeedCancelled):  # DELETE /admin/seed stopped it: nothing published
        return error(f"{exc}; the previous version keeps serving", 409, cancelled=True,
                     version=services.cache.version)  # type: ignore[union-attr]
    if isinstance(exc, PublishUnconfirmed):  # its swap may still land: not "nothing published"
        return error(str(exc), 503, version=services.cache.version)  # type: ignore[union-attr]
    if isinstance(exc, StoreConflict):  # another replica published first: nothing lost
        return error(f"{exc}; nothing was published: retry the request",
                     409, version=services.cache.version)  # type: ignore[union-attr]
    if isinstance(exc, StoreError):  # the store (Redis) is unreachable or inconsistent
        return error(f"{exc}; nothing published, the previous version keeps serving", 503)
    return error(f"{exc}; the previous version keeps serving", 500)


def _bad_request(request: Request, message: str, status: int = 400,
                 **extra: object) -> Response:
    """A request refused for what it sent (its form, a parameter, an upload or entry that
    does not validate): every 400 and 415 is counted, as every refusal is, so a script
    posting the wrong thing shows in the stats."""
    _services(request).stats.error("admin_bad_request")
    return error(message, status, **extra)


async def _json_body(request: Request) -> Any:
    """The request's JSON body (at most MAX_ENTRY_BODY_BYTES), or the error response."""
    try:
        body = json.loads(await _services(request).read_body(request, MAX_ENTRY_BODY_BYTES)
                          or b"null")
    except BodyTooLarge as exc:
        return error(str(exc), 413)
    except BodyTimeout as exc:
        return closing(error(f"{exc}; nothing was changed", 408))
    except BodyAbandoned as exc:  # nobody reads this answer; counted and logged, as refused
        return error(f"{exc}; nothing was changed", 400)
    except RecursionError:
        return _bad_request(request, "the body is not usable JSON: nested too deeply")
    except (ValueError, UnicodeDecodeError) as exc:  # incl. integers of over 4,300 digits
        return _bad_request(request, f"the body is not JSON: {str(exc)[:200]}")
    if has_lone_surrogate(body):
        return _bad_request(request, f"the body is not usable JSON: {LONE_SURROGATE}")
    return body


def _published_entry(services: Services, version: str, entry_id: str) -> Any:
    """The entry as ``version`` (just published) holds it, when this replica serves that
    version; else None. A replica that could not load it yet (the store did not answer: the
    next poll loads it) serves the version before, whose entry is not the one published."""
    loaded = services.cache.loaded  # type: ignore[union-attr]
    if loaded is None or loaded.version != version:
        return None
    return loaded.entries.get(entry_id)


@admin_ready(publishes=True)
async def post_entry(request: Request, services: Services) -> Response:
    body = await _json_body(request)
    if isinstance(body, Response):
        return body
    try:
        report, entry_id, created = await _publisher(request).upsert_entry(body)
    except BadEntry as exc:
        return _bad_request(request, str(exc))
    except _PUBLISH_FAILURES as exc:
        return _publish_failed(exc, services)
    entry = _published_entry(services, report.version, entry_id)
    return JSONResponse({"version": report.version, "created": created,
                         "entry": _entry_json(entry, 0) if entry else None,
                         "report": report_json(report)}, status_code=201 if created else 200)


@admin_ready(publishes=True)
async def delete_entry(request: Request, services: Services) -> Response:
    entry_id = request.path_params["entry_id"]
    try:
        report = await _publisher(request).delete_entry(entry_id)
    except EntryNotFound:
        return error(f"no entry {entry_id!r} in the serving cache version "
                     f"({services.cache.version})", 404)  # type: ignore[union-attr]
    except _PUBLISH_FAILURES as exc:
        return _publish_failed(exc, services)
    return JSONResponse({"version": report.version, "deleted": entry_id,
                         "report": report_json(report)})


# ---------------------------------------------------------------------- seed upload


async def _multipart_file(request: Request) -> tuple[bytes, str] | str:
    """The ``file`` field of a multipart/form-data upload: (content, filename), or why not."""
    try:
        async with request.form(max_files=1, max_fields=16,
                                max_part_size=MAX_UPLOAD_BYTES) as form:
            upload = form.get("file")
            if isinstance(upload, str):  # curl -F 'file=<faq.csv': the CSV as a text field,
                # decoded by the form parser, so its bytes (and a wrong encoding) are gone
                return ("multipart field 'file' came as text, not as a file: send the file "
                        "itself (curl -F file=@faq.csv, with @), or the raw CSV with "
                        "Content-Type: text/csv")
            if not isinstance(upload, UploadFile):
                return ("multipart upload without a 'file' field (send the CSV as field 'file',"
                        " or the raw CSV with Content-Type: text/csv)")
            # curl -F target_wrong_rate=0.05: ignored, the seed published at another target
            other = sorted(name for name in form.keys() if name != "file")
            if other:
                return (f"multipart field(s) {_names(other)} are not read: the upload takes "
                        f"the CSV as field 'file' and its options as query parameters "
                        f"({_SEED_PARAMS_HELP}); nothing published, the previous version "
                        "keeps serving")
            return await upload.read(), upload.filename or "upload.csv"
    except HTTPException as exc:  # Starlette's report of a malformed multipart body
        return f"malformed multipart upload: {exc.detail}"


# What a CSV upload may be labelled (none, text/*, and what browsers and spreadsheets call a
# .csv file). JSON or another type is refused by it: parsed as CSV it gave errors about
# columns that said nothing of it. A form is what curl labels any body it is not told the
# type of: `--data-binary @faq.csv` keeps the file whole (taken as a CSV), `-d @faq.csv`
# strips its line breaks (refused once read: a CSV without line breaks is one line).
_CSV_TYPES = ("", "application/csv", "application/vnd.ms-excel", "application/octet-stream",
              "multipart/form-data")
_FORM = "application/x-www-form-urlencoded"


# The query parameters POST /admin/seed reads. Another one (the CLI's spelling
# target-wrong-rate, a typo) or one given twice was ignored, or one of its values taken,
# and the seed published at a target the operator did not ask for, answering 200.
_SEED_PARAMS = ("target_wrong_rate", "name")
_SEED_PARAMS_HELP = "?target_wrong_rate=0.05&name=faq.csv"


def _names(names: list[str]) -> str:
    shown = ", ".join(repr(n[:40]) for n in names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _unread_params(request: Request, route: str, known: tuple[str, ...],
                   example: str) -> str | None:
    """Why the request's query parameters are not all read as given (one ``route``, e.g.
    ``POST /admin/seed``, does not read, or one given twice), or None. ``known`` empty: the
    route takes none."""
    query = request.query_params
    unknown = sorted(name for name in query.keys() if name not in known)
    if unknown and not known:
        return (f"unknown query parameter(s) {_names(unknown)}: {route} takes no query "
                "parameters (one it would not read is refused, not ignored); nothing was done")
    if unknown:
        takes = ", ".join(known[:-1]) + " and " + known[-1] if len(known) > 1 else known[0]
        return f"unknown query parameter(s) {_names(unknown)}: {route} takes {takes} ({example})"
    twice = [name for name in known if len(query.getlist(name)) > 1]
    if twice:
        return f"query parameter(s) {_names(twice)} given more than once: give each once"
    return None


def _media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def _not_a_csv_upload(media: str) -> str | None:
    if media in _CSV_TYPES or media == _FORM or media.startswith("text/"):
        return None
    return _how_to_upload(f"not Content-Type {media}")


def _how_to_upload(why: str) -> str:
    return (f"POST /admin/seed takes a CSV, {why}: send the file as the raw "
            "body with Content-Type: text/csv (curl -H 'Content-Type: text/csv' --data-binary "
            "@faq.csv; curl -d strips its line breaks) or as the multipart field 'file' (curl "
            "-F file=@faq.csv); one entry as JSON goes to POST /admin/entries; nothing "
            "published, the previous version keeps serving")


@admin_ready(reads_query=True, publishes=True)
async def seed_upload(request: Request, services: Services) -> Response:
    media = _media_type(request.headers.get("content-type", ""))
    refused = _not_a_csv_upload(media)
    if refused is not None:
        return _bad_request(request, refused, 415)
    # Checked before the body is read: a wrong parameter must not wait for 5 MB to arrive.
    unread = _unread_params(request, "POST /admin/seed", _SEED_PARAMS, _SEED_PARAMS_HELP)
    if unread is not None:
        return _bad_request(request, f"{unread}; nothing published, the previous version "
                                     "keeps serving")
    target: float | None = None
    if "target_wrong_rate" in request.query_params:
        try:  # read as the CLI's --target-wrong-rate is
            target = parse_target_wrong_rate(request.query_params["target_wrong_rate"])
        except ValueError as exc:
            return _bad_request(request, f"target_wrong_rate {exc}; nothing published, the "
                                "previous version keeps serving")
    try:
        body = await services.read_body(request, MAX_UPLOAD_BYTES)
    except BodyTooLarge:
        return error(f"the upload is larger than {MAX_UPLOAD_BYTES} bytes", 413)
    except BodyTimeout as exc:
        return closing(error(f"the upload stalled: {exc}; nothing published, the previous "
                             "version keeps serving", 408))
    except BodyAbandoned as exc:  # nobody reads this answer; counted and logged, as refused
        return error(f"{exc}; nothing published, the previous version keeps serving", 400)
    # curl -d strips CR and LF; a lone CR is a line break too (Excel's "CSV (Macintosh)")
    if media == _FORM and not any(b in body.strip() for b in b"\r\n"):
        return _bad_request(request, _how_to_upload(
            f"and this {_FORM} body has no line breaks (curl -d removes them)"), 415)
    named = request.query_params.get("name")
    source = named or "upload.csv"
    if media == "multipart/form-data":
        found = await _multipart_file(request)  # parses the body already read above
        if isinstance(found, str):
            return _bad_request(request, found)
        # The file's own name unless the query names it: `?name=` given and not read was
        # an option taken for nothing, the version recorded under the file's name.
        body, source = found[0], named or found[1]
    if not body.strip():
        return _bad_request(request, "empty upload: send the CSV (columns question, answer, "
                                     "intent, action)")
    try:
        report = await _publisher(request).seed_csv(body, source, target)
    except SeedValidationError as exc:
        listed = exc.errors[:MAX_LISTED_BAD_ROWS]
        more = (f" (the first {len(listed)} listed)" if len(exc.errors) > len(listed) else "")
        return _bad_request(request, f"{source}: {len(exc.errors)} bad row(s), nothing "
                            f"published; the previous version keeps serving{more}",
                            errors=[{"line": e.line, "reason": e.reason} for e in listed],
                            bad_rows=len(exc.errors),
                            version=services.cache.version)  # type: ignore[union-attr]
    except (SeedBusy, SeedError, StoreError, PublishedNotServed) as exc:
        return _publish_failed(exc, services)
    return JSONResponse({"version": report.version, "report": report_json(report)})


@admin_ready
async def seed_status(request: Request, services: Services) -> Response:
    """The seed under way in this process (phase, answers rendered of those to render), or
    how the last one ended (``null`` when none has since the start)."""
    return JSONResponse(_publisher(request).status.snapshot())


@admin_ready
async def cancel_seed(request: Request, services: Services) -> Response:
    """Stop the seed under way (an upload, an entry edit, a promotion) before its next
    answer: it publishes nothing, and its own request answers 409 ``cancelled``. One writing
    its version, or done writing it, cannot be stopped: 409, nothing asked of it."""
    found, published = _publisher(request).cancel_seed()
    if found == PUBLISHED:
        return error(f"the seed under way has already published version {published} (this "
                     f"replica is loading it): nothing to cancel", 409)
    if found == WRITING:
        return error("the seed under way is writing its version to the store (phase "
                     "publishing): that cannot be cancelled; its request answers how it ends "
                     "(200 once published), as GET /admin/seed does", 409)
    if found != CANCELLING:
        return error("no seed is running: nothing to cancel", 409)
    return JSONResponse({"cancelling": True,
                         "detail": "the seed under way stops before its next answer (or before "
                                   "its calibration, or once a calibration under way ends) "
                                   "and publishes nothing; its request "
                                   "answers 409 with the error"}, status_code=202)


# ---------------------------------------------------------------------- misses


async def _miss_groups(services: Services, threshold: float, limit: int,
                       everything: bool, with_keys: bool = False
                       ) -> tuple[int, list[dict[str, Any]]]:
    missed = services.runtime.stats.missed_questions()
    loaded = services.cache.loaded  # type: ignore[union-attr]
    # Without a serving version nothing is confidently an agent intent.
    hit_similarity = loaded.thresholds.hit_similarity if loaded else float("inf")
    if not everything:
        missed = [m for m in missed if not is_agent_intent(m, hit_similarity)]
    groups = await asyncio.to_thread(group_misses, missed, services.runtime.embedder,
                                     threshold, limit, with_keys)
    return len(missed), groups


_TRUE, _FALSE = ("1", "true", "yes"), ("0", "false", "no")

# What GET /admin/misses reads; another parameter (`treshold`) or one given twice was ignored,
# or its last value taken, and the groups listed for something not asked, answering 200.
_MISSES_PARAMS = ("limit", "threshold", "all")
_MISSES_PARAMS_HELP = "?limit=20&threshold=0.75&all=1"
# Plain ASCII digits, and a plain decimal: int() and float() also take underscores (1_0),
# signs, spaces, other scripts' digits, exponents (1e-320), inf and nan. No more groups than
# the misses kept can be listed, so that is the most a limit asks for.
_LIMIT = re.compile(r"0*([0-9]{1,4})")
_DECIMAL = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")


@admin_ready(reads_query=True)
async def misses(request: Request, services: Services) -> Response:
    query = request.query_params
    unread = _unread_params(request, "GET /admin/misses", _MISSES_PARAMS, _MISSES_PARAMS_HELP)
    if unread is not None:
        return _bad_request(request, unread)
    given_limit = query.get("limit", "20")
    digits = _LIMIT.fullmatch(given_limit)
    limit = int(digits.group(1)) if digits else 0
    if not 1 <= limit <= MISSED_KEPT:
        return _bad_request(request, f"limit must be a whole number of groups from 1 to "
                                     f"{MISSED_KEPT}, in digits (e.g. 20); not "
                                     f"{given_limit[:40]!r}")
    given_threshold = query.get("threshold", str(DEFAULT_THRESHOLD))
    threshold = float(given_threshold) if _DECIMAL.fullmatch(given_threshold) else -1.0
    if not 0.0 < threshold <= 1.0:
        return _bad_request(request, f"threshold must be a decimal number in (0, 1], e.g. "
                                     f"{DEFAULT_THRESHOLD}; not {given_threshold[:40]!r}")
    # A value read as neither (`all=on`, a bare `?all`, a typo) is refused: taken for "no",
    # it listed fewer misses than asked for, without a word.
    flag = query.get("all", "0").strip().lower()
    if flag not in _TRUE + _FALSE:
        return _bad_request(request, f"'all' must be 1, true or yes (include the agent "
                                     f"intents) or 0, false or no; not {flag[:40]!r}")
    everything = flag in _TRUE
    total, groups = await _miss_groups(services, threshold, limit, everything)
    return JSONResponse({"total": total, "threshold": threshold,
                         "agent_intents_included": everything, "groups": groups})


_PROMOTE_FIELDS = {"question", "intent", "answer", "threshold", "all"}


def _promotion(body: Any) -> tuple[str, str, str | None, float, bool]:
    """(question, new entry id, answer or None for the draft, threshold, all) or BadEntry."""
    if not isinstance(body, dict):
        raise BadEntry("the body must be a JSON object: {\"question\": <a group's question>, "
                       "\"intent\": <the new entry's name>, \"answer\": <optional>}")
    unknown = sorted(set(body) - _PROMOTE_FIELDS)
    if unknown:
        raise BadEntry(f"unknown field(s): {', '.join(unknown)} "
                       f"(expected {', '.join(sorted(_PROMOTE_FIELDS))})")
    question, intent, answer = body.get("question"), body.get("intent"), body.get("answer")
    if not isinstance(question, str) or not normalize_text(question):
        raise BadEntry("'question' must name the group: one of its questions, as listed by "
                       "GET /admin/misses")
    if not isinstance(intent, str) or not intent.strip():
        raise BadEntry("'intent' must be the new entry's name (its intent), a non-empty "
                       "string")
    if answer is not None and (not isinstance(answer, str) or not answer.strip()):
        raise BadEntry("'answer' must be a non-empty string, or left out for the agent's "
                       "most recent answer")
    threshold = body.get("threshold", DEFAULT_THRESHOLD)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
            or not 0.0 < threshold <= 1.0:
        raise BadEntry("'threshold' must be a number in (0, 1], the one the groups were "
                       "listed with")
    everything = body.get("all", False)
    if not isinstance(everything, bool):
        raise BadEntry("'all' must be true or false")
    return question, intent.strip(), answer, float(threshold), everything


@admin_ready(publishes=True)
async def promote_miss(request: Request, services: Services) -> Response:
    """One group of missed questions -> a new FAQ entry, published like a seed."""
    body = await _json_body(request)
    if isinstance(body, Response):
        return body
    try:
        question, entry_id, answer, threshold, everything = _promotion(body)
    except BadEntry as exc:
        return _bad_request(request, str(exc))
    _, groups = await _miss_groups(services, threshold, 10 ** 6, everything, with_keys=True)
    wanted = normalize_text(question)
    group = next((g for g in groups
                  if wanted in {normalize_text(q) for q in g["questions"]}), None)
    if group is None:
        return error(f"no group of missed questions holds {question[:200]!r} (threshold "
                     f"{threshold:g}); list them again with GET /admin/misses", 404)
    answer = answer.strip() if answer else group["draft_answer"]
    if not answer:
        return _bad_request(request, "the agent never answered these questions, so there is "
                                     "no draft: give the entry's 'answer'")
    # Wordings are callers' own, typed ones too ("@bank do you ...", a message of pages): one
    # the seed would refuse is left out, and said, or the group could never be promoted.
    checked = [(q, question_problems(q)) for q in group["questions"]]
    skipped = [{"question": q, "reason": "; ".join(problems)} for q, problems in checked
               if problems]
    questions = [q for q, problems in checked if not problems]
    if not questions:
        return _bad_request(request, "no question of this group can be a seed question: "
                                     + "; ".join(f"{s['question'][:80]!r}: {s['reason']}"
                                                 for s in skipped[:5]))
    entry = {"intent": entry_id, "answer": answer, "action": "answer", "questions": questions}
    try:
        report, entry_id, _ = await _publisher(request).upsert_entry(entry, create_only=True,
                                                                     kind=PROMOTE)
    except BadEntry as exc:
        return _bad_request(request, str(exc))
    except EntryExists as exc:
        return error(str(exc), 409)
    except _PUBLISH_FAILURES as exc:
        return _publish_failed(exc, services)
    # Answered from now on: every wording of the group leaves the misses list, not only the
    # QUESTIONS_PER_GROUP most frequent the entry learnt (the rest would come back as a group).
    services.runtime.stats.forget_missed(set(group["keys"]), normalize_text)
    published = _published_entry(services, report.version, entry_id)
    return JSONResponse({"version": report.version, "created": True,
                         "entry": _entry_json(published, 0) if published else None,
                         "promoted": {"questions": len(questions),
                                      "calls": group["calls"], "answer": answer,
                                      "skipped": skipped},
                         "report": report_json(report)}, status_code=201)


# ---------------------------------------------------------------------- dashboard


def _dashboard_html() -> str:
    return resources.files("gateway.admin").joinpath("static/dashboard.html").read_text("utf-8")


async def dashboard(request: Request) -> Response:
    """The page itself holds no data (it asks for the token and calls the API), so a browser
    can open it; it is still off when the admin API is."""
    if not auth.configured_token(request):
        return auth.disabled_response()
    return HTMLResponse(_dashboard_html(), headers={
        "Cache-Control": "no-store",
        "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; "
                                   "style-src 'unsafe-inline'; img-src 'self' data:; "
                                   # no other site may frame it (clickjacking its buttons)
                                   "frame-ancestors 'none'"})


async def to_dashboard(request: Request) -> Response:
    """``/admin`` -> the page; off, like the page, when the admin API is."""
    if not auth.configured_token(request):
        return auth.disabled_response()
    return RedirectResponse("/admin/", status_code=307)


# ---------------------------------------------------------------------- no such route


def _is_admin(path: str) -> bool:
    return path == "/admin" or path.startswith("/admin/")


def _admin_routes_of(request: Request) -> list[Route]:
    return [r for r in request.app.router.routes if isinstance(r, Route) and _is_admin(r.path)]


def _method_order(method: str) -> tuple[int, str]:
    known = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
    return (known.index(method) if method in known else len(known), method)


def _shown(methods: Any) -> str:
    return ", ".join(m for m in sorted(set(methods), key=_method_order) if m != "HEAD")


async def unmatched(request: Request, exc: Exception) -> Response:
    """Starlette's 404 (no route has the path) and 405 (none of the path's routes has the
    method): under /admin JSON in the admin API's error shape, saying which methods the
    path takes or which routes there are, the token checked first and the refusal counted,
    as on every admin route; elsewhere Starlette's own plain-text answer, as before."""
    assert isinstance(exc, HTTPException)
    scope = request.scope
    path = scope["path"]
    if scope.get("root_path") and path.startswith(scope["root_path"]):
        path = path[len(scope["root_path"]):]
    if not _is_admin(path):
        return PlainTextResponse(exc.detail, status_code=exc.status_code, headers=exc.headers)
    refused = auth.check(request)
    if refused is not None:
        return refused
    routes = _admin_routes_of(request)
    # Starlette's own Allow names the first of the path's routes only (GET, not DELETE).
    matching = [r for r in routes if r.matches(scope)[0] is not Match.NONE]
    allowed = sorted({m for r in matching for m in r.methods or ()}, key=_method_order)
    if matching and request.method in allowed:  # raised by a route's own handler
        return error(str(exc.detail), exc.status_code)
    if matching:
        hint = ("; an entry is added or changed with POST /admin/entries, its intent in the "
                "body" if matching[0].path == "/admin/entries/{entry_id}"
                and request.method in ("POST", "PUT", "PATCH") else "")
        response = _bad_request(request, f"{request.method} is not allowed on {path}: "
                                         f"{matching[0].path} takes {_shown(allowed)}{hint}",
                                405, allowed=allowed)
        response.headers["Allow"] = ", ".join(allowed)
        return response
    entries = "/admin/entries/"
    if path.startswith(entries) and "/" in path[len(entries):].strip("/"):
        # %2F is decoded before routing, so no URL holds a '/' in an id; ids never have one
        name = path[len(entries):]
        return _bad_request(request, (
            f"no admin route {request.method} {path}: an entry's id holds no '/', and a '/' "
            f"in the URL, %2F included (it is decoded before routing), ends the id. An entry "
            f"whose intent name holds a '/' is addressed by its id, as GET /admin/entries "
            f"lists it: {entry_id_for(name)!r} for the intent {name!r}"), 404)
    paths: dict[str, list[str]] = {}
    for route in routes:
        paths.setdefault(route.path, []).extend(route.methods or ())
    listing = "; ".join(f"{_shown(methods)} {p}" for p, methods in paths.items())
    return _bad_request(request, f"no admin route {request.method} {path}: the admin API's "
                                 f"routes are {listing} (docs/operations.md, Admin API)", 404)


def admin_exception_handlers() -> dict[Any, Callable[[Request, Exception], Awaitable[Response]]]:
    """For the app: JSON for a path or method under /admin that no route takes."""
    return {404: unmatched, 405: unmatched}


def admin_routes() -> list[BaseRoute]:
    return [
        Route("/admin", to_dashboard),
        Route("/admin/", dashboard),
        Route("/admin/stats", stats),
        Route("/admin/entries", list_entries, methods=["GET"]),
        Route("/admin/entries", post_entry, methods=["POST"]),
        Route("/admin/entries/{entry_id}", get_entry, methods=["GET"]),
        Route("/admin/entries/{entry_id}", delete_entry, methods=["DELETE"]),
        Route("/admin/seed", seed_status, methods=["GET"]),
        Route("/admin/seed", seed_upload, methods=["POST"]),
        Route("/admin/seed", cancel_seed, methods=["DELETE"]),
        Route("/admin/misses", misses),
        Route("/admin/misses/promote", promote_miss, methods=["POST"]),
    ]
