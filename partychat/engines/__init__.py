"""Engines: the ways a persona can run its model, all behind one small interface.

A persona (``partychat.persona.participant``) talks to a ``ChatModel`` (``base.py``) and never learns
which engine is behind it:

- ``await model.count_tokens(request) -> int``: the prompt's size, for the history budget. Raise
  ``SystemRoleUnsupported`` when the chat template refuses a system message; prompt building then
  folds the persona into the first user turn and asks again.
- ``model.stream(request, stop)``: an async iterator of text pieces whose join is the raw reply.
  It must end soon after ``stop`` (a ``StopFlag``) is set, and also when the consumer stops
  iterating (``aclose``), so a server engine closes its HTTP stream at once: await ``stop.wait()``
  alongside the stream. Honour ``request.temperature`` (0 is greedy) and ``request.max_tokens``.
- ``await model.aclose()``: free threads, memory, connections.

A ``ChatRequest`` holds the messages (``{"role", "content"}`` dicts: a system message with the
persona, then user and assistant turns), the speaker's name, the temperature and max_tokens.
Everything else a persona does (history budget, persona merging, reply cleaning, sentence-wise
partials, passing on an empty reply) is shared code in ``partychat.persona.generation`` and ``participant``.

One instance may serve several personas in one process. It keeps no per-persona state, only
caches, and generates one reply at a time: in-process engines subclass ``ThreadedChatModel``,
whose single worker thread keeps the event loop free and serialises generations.

Errors are ``EngineError`` subclasses whose message is one sentence for the user:
``ModelError`` (the model cannot be used; ``EngineNotInstalled`` says what to pip install) stops
the client with exit code 2 at start-up; ``EngineUnavailable`` (a server down) and
``PromptTooLong`` during a turn make the persona pass that turn with the message as its reason.

``registry.py`` holds one entry per engine (its name, whether it is installed, its install hint,
how to open a model on it) and picks one for ``--engine auto``. Engines: ``transformers_engine``
(in process, transformers), ``llama_cpp_engine`` (in process, llama-cpp-python), and an
OpenAI-compatible HTTP engine (``openai_engine``). A new engine is a module here and one entry
in ``registry.ENGINES``; a chat template's refusal is read by ``base.chat_template_error``.
"""
