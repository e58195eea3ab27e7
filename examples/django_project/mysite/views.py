from django.contrib.auth.decorators import login_required
from django.http import HttpResponse, JsonResponse
from django.views.decorators.csrf import ensure_csrf_cookie

PAGE = """<!doctype html>
<meta charset="utf-8">
<title>Chat on Django</title>
<ul id="messages"></ul>
<form id="say"><input name="text" autocomplete="off" autofocus> <button>Send</button></form>
<script src="/scripts/comet.js"></script>
<script>
  comet.ping.message = function (pkg) {
    var item = document.createElement("li");
    item.textContent = pkg.sender + ": " + pkg.text;
    document.getElementById("messages").append(item);
  };
  comet.start();
  comet.push({type: "join", listeners: ["chat"]});
  document.getElementById("say").onsubmit = function (event) {
    event.preventDefault();
    comet.push({type: "message", listeners: ["chat"], text: this.text.value});
    this.reset();
  };
</script>
"""


@login_required
def chat(request):
    return HttpResponse(PAGE)


@ensure_csrf_cookie
def hello(request):
    """Django's own route: a POST needs Django's CSRF token, as every POST here does."""
    return JsonResponse({"hello": "from Django", "method": request.method})
