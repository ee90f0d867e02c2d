"""A fake of Twilio's REST API for one resource: updating a live call.

``POST /2010-04-01/Accounts/{AccountSid}/Calls/{CallSid}.json`` with HTTP Basic auth
(account SID : auth token) and a form body (``Twiml``, ``Status``, ...), answered with
the call's JSON as Twilio documents it. Errors use Twilio's error shape
(``{"code", "message", "more_info", "status"}``): 401 for wrong credentials, or the
``status`` a test sets (with Twilio's ``code``, if it sets one: 21220 "Call is not
in-progress"), or with ``twilio_body`` off a bare page (a proxy's, a wrong base URL's).
Every request is recorded, refused ones too.
"""

from __future__ import annotations

import base64
from typing import Any
from urllib.parse import parse_qsl

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


class FakeTwilioRest:
    def __init__(self, account_sid: str, auth_token: str) -> None:
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.requests: list[dict[str, Any]] = []
        self.status = 200  # set to 404 / 500 to fail the next requests
        self.code: int | None = None  # Twilio's error code for them (else 20404 / 20500)
        self.twilio_body = True  # False: the error is a bare page, not Twilio's JSON
        self.app = Starlette(routes=[Route(
            "/2010-04-01/Accounts/{account}/Calls/{call}.json", self._update_call,
            methods=["POST"])])

    def _error(self, status: int, code: int, message: str) -> Response:
        return JSONResponse({"code": code, "message": message, "status": status,
                             "more_info": f"https://www.twilio.com/docs/errors/{code}"},
                            status_code=status)

    async def _update_call(self, request: Request) -> Response:
        body = (await request.body()).decode()
        form = dict(parse_qsl(body, keep_blank_values=True))
        scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
        user, _, password = (base64.b64decode(encoded).decode().partition(":")
                             if scheme == "Basic" and encoded else ("", "", ""))
        account, call = request.path_params["account"], request.path_params["call"]
        self.requests.append({"account": account, "call": call, "form": form, "user": user,
                              "password": password,
                              "content_type": request.headers.get("content-type", "")})
        if (user, password) != (self.account_sid, self.auth_token) or account != user:
            return self._error(401, 20003, "Authenticate")
        if self.status != 200 and not self.twilio_body:
            return Response("Not Found", status_code=self.status, media_type="text/plain")
        if self.status != 200 and self.code == 21220:
            return self._error(self.status, 21220, "Call is not in-progress. Cannot redirect.")
        if self.status != 200:
            return self._error(self.status, 20404 if self.status == 404 else 20500,
                               "The requested resource was not found" if self.status == 404
                               else "Internal Server Error")
        return JSONResponse({"sid": call, "account_sid": account,
                             "status": form.get("Status", "in-progress"),
                             "api_version": "2010-04-01",
                             "uri": f"/2010-04-01/Accounts/{account}/Calls/{call}.json"})
