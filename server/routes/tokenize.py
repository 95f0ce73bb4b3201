"""POST /tokenize and POST /detokenize, in vLLM's shapes: a prompt or chat messages to token ids, ids to text."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from models.api import TokenizeParams
from server.deps import ReadyEngine
from server.openai_schemas import ChatMessage, Prompt
from server.routes.openai import split_model_id
from server.schemas import ERROR_RESPONSES
from server.tool_schemas import ChatTool, template_tool

router = APIRouter(tags=["tokenize"], responses=ERROR_RESPONSES)
_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)
ModelId = Annotated[str | None, Field(None, min_length=1, max_length=300,
                                      description="model id; default: the startup model")]
AddSpecialTokens = Annotated[StrictBool | None, Field(
    None, description="add the tokenizer's special tokens (BOS); default: as generation does, so that "
                      "`count` is the request's prompt_tokens")]


class TokenizeCompletionRequest(BaseModel):
    model_config = _STRICT
    model: ModelId
    prompt: Prompt
    add_special_tokens: AddSpecialTokens
    return_token_strs: StrictBool | None = False


class TokenizeChatRequest(BaseModel):
    model_config = _STRICT
    model: ModelId
    messages: list[ChatMessage] = Field(min_length=1, max_length=1000)
    tools: list[ChatTool] | None = Field(None, max_length=128, description="rendered where the template "
                                         "supports tools, else a 400")
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    add_special_tokens: AddSpecialTokens
    return_token_strs: StrictBool | None = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = _STRICT
    model: ModelId
    tokens: list[Annotated[int, Field(ge=0, le=2**31 - 1)]] = Field(max_length=1_000_000)


class DetokenizeResponse(BaseModel):
    prompt: str


@router.post("/tokenize", response_model=TokenizeResponse, response_model_exclude_none=True,
             summary="Token ids of a prompt, or of chat messages through the chat template (vLLM's shape)")
async def tokenize(body: TokenizeCompletionRequest | TokenizeChatRequest, engine: ReadyEngine) -> TokenizeResponse:
    model, dtype = split_model_id(body.model, None)
    if isinstance(body, TokenizeChatRequest):
        params = TokenizeParams(
            model=model, dtype=dtype, messages=tuple({"role": m.role, "content": m.text()} for m in body.messages),
            tools=tuple(template_tool(t.function.name, t.function.description, t.function.parameters)
                        for t in body.tools) if body.tools else None,
            add_special_tokens=body.add_special_tokens, add_generation_prompt=body.add_generation_prompt,
            continue_final_message=body.continue_final_message)
    else:
        params = TokenizeParams(model=model, dtype=dtype, prompt=body.prompt,
                                add_special_tokens=body.add_special_tokens)
    done = await engine.tokenize(params)
    return TokenizeResponse(count=len(done.tokens), max_model_len=done.max_model_len, tokens=list(done.tokens),
                            token_strs=list(done.token_strs) if body.return_token_strs else None)


@router.post("/detokenize", response_model=DetokenizeResponse, summary="The text of token ids (vLLM's shape)")
async def detokenize(body: DetokenizeRequest, engine: ReadyEngine) -> DetokenizeResponse:
    model, _ = split_model_id(body.model, None)
    return DetokenizeResponse(prompt=await engine.detokenize(model, tuple(body.tokens)))
