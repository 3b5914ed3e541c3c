// `nibble serve` over loopback (stories260K on the CPU): completions and chat, streamed and not,
// against the engine's own answer for the same prompt; usage; stop strings; 64 concurrent streams;
// every error status; a client leaving mid-stream; the chat templates' text.
#include <gtest/gtest.h>
#include <malloc.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <random>
#include <fstream>
#include <thread>

#include <httplib.h>
#include <nlohmann/json.hpp>

#include "nibble/backend/cpu/executor.h"
#include "nibble/core/error.h"
#include "nibble/engine/engine.h"
#include "nibble/model/model.h"
#include "nibble/server/server.h"
#include "nibble/tokenizer/tokenizer.h"
#include "tests/test_util.h"

namespace nibble::server {
namespace {

using json = nlohmann::json;
#define REQUIRE_STORIES() NIBBLE_REQUIRE_DATA("models/stories260K/model.safetensors")
constexpr const char* kKey = "test-key";

struct Stories {
  std::unique_ptr<Model> model = Model::load(test::data_dir() / "models/stories260K");
  Tokenizer tok = Tokenizer::load(test::data_dir() / "models/stories260K");
};
Stories& stories() {
  static Stories s;
  return s;
}

// The engine's answer to one request alone: the reference for the server's.
struct Direct {
  std::string text;
  int64_t tokens = 0;
  FinishReason finish = FinishReason::None;
};
Direct direct(Request r) {
  cpu::CpuExecutor exec(*stories().model, {});
  Engine engine(exec, &stories().tok, {.prefix_caching = false});
  Direct d;
  engine.submit(std::move(r), [&](const OutputEvent& ev) {
    d.text += ev.text;
    d.tokens += ev.token.id >= 0;
    d.finish = ev.finish;
  });
  engine.run();
  return d;
}
Direct direct_completion(const std::string& prompt, int64_t max_tokens, std::vector<std::string> stop = {}) {
  Request r;
  r.prompt = stories().tok.encode(prompt, true);
  r.stop.max_tokens = max_tokens;
  r.stop.stop_strings = std::move(stop);
  return direct(std::move(r));
}

// A server on an ephemeral loopback port, with its own executor and engine.
struct Served {
  cpu::CpuExecutor exec;
  Engine engine;
  Server server;
  int port;
  std::thread listener;
  // No prefix caching by default, so pages go back to 0 when idle.
  explicit Served(ServerOptions opt, RuntimeOptions runtime = {}, EngineOptions engine_opt = {.prefix_caching = false})
      : exec(*stories().model, runtime),
        engine(exec, &stories().tok, engine_opt),
        server(engine, stories().tok, with_defaults(std::move(opt))),
        port(server.bind("127.0.0.1", 0)),
        listener([this] { server.listen(); }) {}
  ~Served() {
    server.stop();
    listener.join();
  }
  static ServerOptions with_defaults(ServerOptions opt) {
    opt.model_name = "stories";
    return opt;
  }
  httplib::Client client(const char* key = kKey) const {
    httplib::Client c("127.0.0.1", port);
    c.set_read_timeout(30);
    if (key) c.set_default_headers({{"Authorization", std::string("Bearer ") + key}});
    return c;
  }
  httplib::Result post(const std::string& path, const json& body, const char* key = kKey) const {
    return client(key).Post(path.c_str(), body.dump(), "application/json");
  }
  // The SSE stream of a request: each data payload, in order.
  std::vector<std::string> stream(const std::string& path, const json& body) const {
    auto c = client();
    httplib::Request req;
    req.method = "POST";
    req.path = path;
    req.body = body.dump();
    req.set_header("Content-Type", "application/json");
    req.set_header("Authorization", std::string("Bearer ") + kKey);
    std::string raw;
    req.content_receiver = [&](const char* data, size_t n, uint64_t, uint64_t) {
      raw.append(data, n);
      return true;
    };
    httplib::Response res;
    httplib::Error err;
    EXPECT_TRUE(c.send(req, res, err)) << httplib::to_string(err);
    EXPECT_EQ(res.status, 200);
    std::vector<std::string> events;
    for (size_t at = 0; (at = raw.find("data: ", at)) != std::string::npos;) {
      const size_t end = raw.find("\n\n", at);
      EXPECT_NE(end, std::string::npos) << "an event without its blank line";
      if (end == std::string::npos) break;
      events.push_back(raw.substr(at + 6, end - at - 6));
      at = end + 2;
    }
    return events;
  }
  int64_t metric(const std::string& name) const {
    auto res = client().Get("/metrics");
    EXPECT_TRUE(res && res->status == 200);
    const size_t at = res->body.find("\n" + name + " ");
    EXPECT_NE(at, std::string::npos) << name;
    return at == std::string::npos ? -1 : std::stoll(res->body.substr(at + name.size() + 2));
  }
  // Waits (bounded) until `done`; false when it never was.
  template <class F>
  static bool wait_until(F done, int seconds = 20) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(seconds);
    while (!done()) {
      if (std::chrono::steady_clock::now() > deadline) return false;
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    return true;
  }
  // Holds the engine as soon as a request has its first token (so it is mid-generation) or was aborted.
  std::unique_lock<std::mutex> hold_once_running() {
    EXPECT_TRUE(wait_until([&] { return server.metrics().running > 0 || server.metrics().aborted > 0; }));
    return server.hold_engine();
  }
};

ServerOptions keyed() {
  ServerOptions o;
  o.api_key = kKey;
  o.chat_template = ChatTemplate::named("llama-2");  // stories260K has none
  return o;
}

// The text of a completions or chat stream, its finish reason and its usage chunk; checks the shape.
struct Streamed {
  std::string text, finish;
  json usage;
};
Streamed join_stream(const std::vector<std::string>& events, bool chat, size_t choice = 0) {
  Streamed s;
  EXPECT_GE(events.size(), 2u);
  if (events.empty()) return s;
  EXPECT_EQ(events.back(), "[DONE]");
  for (size_t i = 0; i + 1 < events.size(); ++i) {
    const json chunk = json::parse(events[i]);
    EXPECT_EQ(chunk["object"], chat ? "chat.completion.chunk" : "text_completion");
    if (chunk.contains("usage") && !chunk["usage"].is_null()) s.usage = chunk["usage"];
    if (chunk["choices"].empty() || chunk["choices"][0]["index"] != choice) continue;
    EXPECT_EQ(chunk["choices"].size(), 1u);
    const json& c = chunk["choices"][0];
    EXPECT_TRUE(s.finish.empty()) << "a chunk after the finish: " << events[i];
    if (c["finish_reason"].is_string()) s.finish = c["finish_reason"];
    const json& text = chat ? c["delta"].value("content", json("")) : c["text"];
    s.text += text.get<std::string>();
  }
  return s;
}

TEST(Serve, CompletionEqualsTheEnginesGreedyAnswer) {
  REQUIRE_STORIES();
  Served s(keyed());
  const std::string prompt = "Once upon a time, there was a";
  const Direct want = direct_completion(prompt, 40);
  auto res = s.post("/v1/completions", {{"model", "stories"}, {"prompt", prompt}, {"max_tokens", 40}, {"temperature", 0}});
  ASSERT_TRUE(res);
  ASSERT_EQ(res->status, 200) << res->body;
  const json body = json::parse(res->body);
  EXPECT_EQ(body["object"], "text_completion");
  EXPECT_EQ(body["choices"][0]["text"], want.text);
  EXPECT_EQ(body["choices"][0]["finish_reason"], finish_reason_name(want.finish));
  EXPECT_EQ(body["usage"]["prompt_tokens"], stories().tok.encode(prompt, true).size());
  EXPECT_EQ(body["usage"]["completion_tokens"], want.tokens);
  EXPECT_EQ(body["usage"]["total_tokens"], body["usage"]["prompt_tokens"].get<int64_t>() + want.tokens);
  // echo puts the prompt before the answer.
  res = s.post("/v1/completions", {{"prompt", prompt}, {"max_tokens", 40}, {"temperature", 0}, {"echo", true}});
  ASSERT_TRUE(res && res->status == 200);
  EXPECT_EQ(json::parse(res->body)["choices"][0]["text"], prompt + want.text);
}

TEST(Serve, StreamedCompletionEqualsTheAnswerWithUsageAndDone) {
  REQUIRE_STORIES();
  Served s(keyed());
  const std::string prompt = "The little dog";
  const Direct want = direct_completion(prompt, 30);
  const auto events = s.stream("/v1/completions", {{"prompt", prompt},
                                                   {"max_tokens", 30},
                                                   {"temperature", 0},
                                                   {"stream", true},
                                                   {"stream_options", {{"include_usage", true}}}});
  const Streamed got = join_stream(events, false);
  EXPECT_EQ(got.text, want.text);
  EXPECT_EQ(got.finish, finish_reason_name(want.finish));
  ASSERT_TRUE(got.usage.is_object()) << "no usage chunk";
  EXPECT_EQ(got.usage["completion_tokens"], want.tokens);
  EXPECT_EQ(got.usage["prompt_tokens"], stories().tok.encode(prompt, true).size());
}

TEST(Serve, ChatStreamedAndNotEqualsTheEngineOnTheTemplatesPrompt) {
  REQUIRE_STORIES();
  Served s(keyed());
  const json messages = json::array({{{"role", "system"}, {"content", "Tell a story."}},
                                     {{"role", "user"}, {"content", "A cat and a dog"}}});
  Request r;
  r.prompt = stories().tok.encode(
      ChatTemplate::named("llama-2").render({{"system", "Tell a story."}, {"user", "A cat and a dog"}}), false);
  r.stop.max_tokens = 25;
  const Direct want = direct(r);
  auto res = s.post("/v1/chat/completions", {{"messages", messages}, {"max_tokens", 25}, {"temperature", 0}});
  ASSERT_TRUE(res);
  ASSERT_EQ(res->status, 200) << res->body;
  const json body = json::parse(res->body);
  EXPECT_EQ(body["object"], "chat.completion");
  EXPECT_EQ(body["choices"][0]["message"]["role"], "assistant");
  EXPECT_EQ(body["choices"][0]["message"]["content"], want.text);
  EXPECT_EQ(body["usage"]["prompt_tokens"], r.prompt.size());
  const auto events = s.stream("/v1/chat/completions",
                               {{"messages", messages}, {"max_tokens", 25}, {"temperature", 0}, {"stream", true}});
  ASSERT_FALSE(events.empty());
  EXPECT_EQ(json::parse(events[0])["choices"][0]["delta"]["role"], "assistant");
  const Streamed got = join_stream(events, true);
  EXPECT_EQ(got.text, want.text);
  EXPECT_EQ(got.finish, finish_reason_name(want.finish));
}

// n choices per prompt, prompts as a list of strings and of token ids: choice p*n + i is prompt
// p's answer sampled with seed + (p*n + i), each the engine's answer to that request alone.
TEST(Serve, NChoicesAndPromptListsEachEqualTheirOwnRequest) {
  REQUIRE_STORIES();
  Served s(keyed());
  const Tokenizer& tok = stories().tok;
  const std::vector<int32_t> ids = tok.encode("The big red ball", true);
  const std::vector<std::vector<int32_t>> prompts = {tok.encode("Once upon a time", true), tok.encode("Tom said", true), ids};
  constexpr int kN = 3, kSeed = 77, kMax = 12;
  std::vector<Direct> want;
  for (size_t p = 0; p < prompts.size(); ++p)
    for (int i = 0; i < kN; ++i) {
      Request r;
      r.prompt = prompts[p];
      r.stop.max_tokens = kMax;
      r.sampling = {.temperature = 0.8f, .seed = uint64_t(kSeed) + p * kN + uint64_t(i)};
      want.push_back(direct(r));
    }
  EXPECT_NE(want[0].text, want[1].text) << "the choices of one prompt should differ (seed + i)";
  const json body = {{"prompt", json::array({json("Once upon a time"), json("Tom said")})},
                     {"n", kN}, {"max_tokens", kMax}, {"temperature", 0.8}, {"seed", kSeed}};
  // The two string prompts in one request, the token ids in another (whose choices start at seed + 0).
  json by_ids = body;
  by_ids["prompt"] = ids;
  by_ids["seed"] = kSeed + 2 * kN;
  auto res = s.post("/v1/completions", body);
  ASSERT_TRUE(res && res->status == 200) << (res ? res->body : "");
  const json answer = json::parse(res->body);
  ASSERT_EQ(answer["choices"].size(), size_t(2 * kN)) << answer;
  int64_t completion = 0;
  for (size_t c = 0; c < 2 * kN; ++c) {
    EXPECT_EQ(answer["choices"][c]["index"], c);
    EXPECT_EQ(answer["choices"][c]["text"], want[c].text) << "choice " << c;
    completion += want[c].tokens;
  }
  EXPECT_EQ(answer["usage"]["prompt_tokens"], prompts[0].size() + prompts[1].size());  // each prompt once
  EXPECT_EQ(answer["usage"]["completion_tokens"], completion);
  res = s.post("/v1/completions", by_ids);
  ASSERT_TRUE(res && res->status == 200) << (res ? res->body : "");
  for (size_t c = 0; c < kN; ++c)
    EXPECT_EQ(json::parse(res->body)["choices"][c]["text"], want[2 * kN + c].text) << "token-id choice " << c;
  // Streamed: each choice's chunks carry its index and join to the same text.
  json streamed = body;
  streamed["stream"] = true;
  streamed["stream_options"] = {{"include_usage", true}};
  const auto events = s.stream("/v1/completions", streamed);
  for (size_t c = 0; c < 2 * kN; ++c) {
    const Streamed got = join_stream(events, false, c);
    EXPECT_EQ(got.text, want[c].text) << "streamed choice " << c;
    EXPECT_EQ(got.finish, finish_reason_name(want[c].finish));
    EXPECT_EQ(got.usage, answer["usage"]);
  }
  // Chat's n choices.
  res = s.post("/v1/chat/completions", {{"messages", json::array({json{{"role", "user"}, {"content", "Hi"}}})},
                                        {"n", 2}, {"max_tokens", 5}, {"temperature", 0}});
  ASSERT_TRUE(res && res->status == 200) << (res ? res->body : "");
  const json chat = json::parse(res->body);
  ASSERT_EQ(chat["choices"].size(), 2u);
  EXPECT_EQ(chat["choices"][0]["message"], chat["choices"][1]["message"]);  // greedy: alike
  // The engine thread counts pages after the step that answered.
  EXPECT_TRUE(Served::wait_until([&] { return s.server.metrics().kv_pages_used == 0; }));
}

// echo with logprobs: the prompt's tokens come first, the first without a logprob, each other
// with its own and its top alternatives; then the answer's, as without echo.
TEST(Serve, EchoWithLogprobsScoresThePrompt) {
  REQUIRE_STORIES();
  Served s(keyed());
  const std::string prompt = "Once upon a time, there was a cat";
  const std::vector<int32_t> ids = stories().tok.encode(prompt, true);
  const json plain = {{"prompt", prompt}, {"max_tokens", 6}, {"temperature", 0}, {"logprobs", 2}};
  json echo = plain;
  echo["echo"] = true;
  auto a = s.post("/v1/completions", plain), b = s.post("/v1/completions", echo);
  ASSERT_TRUE(a && a->status == 200 && b && b->status == 200) << (b ? b->body : "");
  const json without = json::parse(a->body)["choices"][0], with = json::parse(b->body)["choices"][0];
  EXPECT_EQ(with["text"], prompt + without["text"].get<std::string>());
  const json& lp = with["logprobs"];
  const size_t p = ids.size();
  ASSERT_EQ(lp["tokens"].size(), p + 6) << lp;
  EXPECT_TRUE(lp["token_logprobs"][0].is_null());
  EXPECT_TRUE(lp["top_logprobs"][0].is_null());
  for (size_t i = 0; i < p; ++i) {
    int32_t id = ids[i];
    EXPECT_EQ(lp["tokens"][i], stories().tok.decode(std::span(&id, 1))) << i;
    if (i == 0) continue;
    const float got = lp["token_logprobs"][i];
    EXPECT_LT(got, 0.0f) << i;
    ASSERT_EQ(lp["top_logprobs"][i].size(), 2u) << i;
    float best = -1e30f;
    for (const auto& [t, v] : lp["top_logprobs"][i].items()) best = std::max(best, v.get<float>());
    EXPECT_LE(got, best) << i;
  }
  // Prompt offsets grow through the echoed prompt; the answer's start at its end.
  for (size_t i = 1; i < p; ++i) EXPECT_GE(lp["text_offset"][i], lp["text_offset"][i - 1]);
  EXPECT_LT(lp["text_offset"][p - 1].get<size_t>(), prompt.size());
  for (size_t i = 0; i < 6; ++i) {
    EXPECT_EQ(lp["tokens"][p + i], without["logprobs"]["tokens"][i]) << i;
    EXPECT_FLOAT_EQ(lp["token_logprobs"][p + i].get<float>(), without["logprobs"]["token_logprobs"][i].get<float>()) << i;
    EXPECT_EQ(lp["text_offset"][p + i].get<size_t>(), prompt.size() + without["logprobs"]["text_offset"][i].get<size_t>());
  }
  // Streamed: the echo chunk carries the prompt's logprobs.
  echo["stream"] = true;
  const auto events = s.stream("/v1/completions", echo);
  ASSERT_GE(events.size(), 2u);
  const json first = json::parse(events[0])["choices"][0];
  EXPECT_EQ(first["text"], prompt);
  EXPECT_EQ(first["logprobs"]["token_logprobs"], json(std::vector<json>(lp["token_logprobs"].begin(), lp["token_logprobs"].begin() + ptrdiff_t(p))));
  EXPECT_EQ(join_stream(events, false).text, with["text"]);
}

// Completions' logprobs: one entry per generated token, the sampled token among the top n;
// chat's: the same numbers in its content list.
TEST(Serve, LogprobsListEachTokenWithItsTopAlternatives) {
  REQUIRE_STORIES();
  Served s(keyed());
  auto res = s.post("/v1/completions", {{"prompt", "Once upon a time"}, {"max_tokens", 8}, {"temperature", 0}, {"logprobs", 3}});
  ASSERT_TRUE(res && res->status == 200) << (res ? res->body : "");
  const json body = json::parse(res->body);
  const json& lp = body["choices"][0]["logprobs"];
  ASSERT_EQ(lp["tokens"].size(), 8u) << lp;
  ASSERT_EQ(lp["token_logprobs"].size(), 8u);
  for (size_t i = 0; i < 8; ++i) {
    const json& top = lp["top_logprobs"][i];
    EXPECT_EQ(top.size(), 3u) << top;
    // Greedy: the sampled token is the most likely, so its logprob is the top's largest.
    float best = -1e30f;
    for (const auto& [tok, v] : top.items()) best = std::max(best, v.get<float>());
    EXPECT_FLOAT_EQ(lp["token_logprobs"][i].get<float>(), best) << i;
    EXPECT_LE(best, 0.0f);
  }
  // Offsets index the answer's text: they start at 0 and grow up to its length.
  EXPECT_EQ(lp["text_offset"][0], 0);
  for (size_t i = 1; i < 8; ++i) EXPECT_GE(lp["text_offset"][i], lp["text_offset"][i - 1]);
  EXPECT_LT(lp["text_offset"][7].get<size_t>(), body["choices"][0]["text"].get<std::string>().size());
  res = s.post("/v1/chat/completions", {{"messages", json::array({json{{"role", "user"}, {"content", "Hi"}}})},
                                        {"max_tokens", 5},
                                        {"temperature", 0},
                                        {"logprobs", true},
                                        {"top_logprobs", 2}});
  ASSERT_TRUE(res && res->status == 200) << (res ? res->body : "");
  const json chat = json::parse(res->body);
  const json& content = chat["choices"][0]["logprobs"]["content"];
  ASSERT_EQ(content.size(), 5u) << chat;
  for (const auto& t : content) {
    ASSERT_EQ(t["top_logprobs"].size(), 2u) << t;
    EXPECT_FLOAT_EQ(t["logprob"].get<float>(), t["top_logprobs"][0]["logprob"].get<float>()) << t;
    EXPECT_EQ(t["token"], t["top_logprobs"][0]["token"]) << t;
  }
}

TEST(Serve, ChatWithoutATemplateIsRefused) {
  REQUIRE_STORIES();
  Served s(ServerOptions{});  // stories260K has no chat template and none was given
  auto res = s.post("/v1/chat/completions", {{"messages", json::array({json{{"role", "user"}, {"content", "Hi"}}})}}, nullptr);
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 400);
  EXPECT_NE(res->body.find("--chat-template"), std::string::npos) << res->body;
  EXPECT_EQ(s.post("/v1/completions", {{"prompt", "Hi"}, {"max_tokens", 2}}, nullptr)->status, 200);
}

// The stop string spans tokens: a stream that sent its first part before seeing the rest would leak it.
TEST(Serve, StopStringsNeverLeakIntoAStream) {
  REQUIRE_STORIES();
  Served s(keyed());
  const std::string prompt = "Once upon a time";
  const std::string full = direct_completion(prompt, 40).text;
  const std::string stop = "irl nam";  // inside " girl named"
  ASSERT_NE(full.find(stop), std::string::npos) << full;
  const auto events = s.stream("/v1/completions", {{"prompt", prompt},
                                                   {"max_tokens", 40},
                                                   {"temperature", 0},
                                                   {"stream", true},
                                                   {"stop", json::array({"zzz", stop})}});
  const Streamed got = join_stream(events, false);
  EXPECT_EQ(got.text, full.substr(0, full.find(stop)));
  EXPECT_EQ(got.finish, "stop");
  // A string stop, not streamed: the same text.
  auto res = s.post("/v1/completions", {{"prompt", prompt}, {"max_tokens", 40}, {"temperature", 0}, {"stop", stop}});
  ASSERT_TRUE(res && res->status == 200);
  EXPECT_EQ(json::parse(res->body)["choices"][0]["text"], got.text);
}

TEST(Serve, SixtyFourConcurrentStreamsEachEqualTheirSerialAnswer) {
  REQUIRE_STORIES();
  Served s(keyed());
  constexpr int kClients = 64;
  std::vector<std::string> prompts, want;
  const char* subjects[] = {"The cat", "A big dog", "Lily", "Tom and Sue", "The sun", "A bird", "The tree", "Ben"};
  for (int i = 0; i < kClients; ++i) {
    prompts.push_back(fmt::format("{} {}", subjects[i % 8], std::string(size_t(i / 8), '!')));
    want.push_back(direct_completion(prompts.back(), 12 + i % 5).text);
  }
  std::vector<std::string> got(kClients);
  std::vector<std::thread> clients;
  for (int i = 0; i < kClients; ++i)
    clients.emplace_back([&, i] {
      got[size_t(i)] = join_stream(s.stream("/v1/completions", {{"prompt", prompts[size_t(i)]},
                                                                {"max_tokens", 12 + i % 5},
                                                                {"temperature", 0},
                                                                {"stream", true}}),
                                   false)
                           .text;
    });
  for (auto& t : clients) t.join();
  for (int i = 0; i < kClients; ++i) EXPECT_EQ(got[size_t(i)], want[size_t(i)]) << "client " << i;
  EXPECT_EQ(s.metric("nibble_requests_finished_total"), kClients);
  EXPECT_TRUE(Served::wait_until([&] { return s.server.metrics().kv_pages_used == 0; }));
}

void expect_error(const httplib::Result& res, int status, const std::string& param = "") {
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, status) << res->body;
  const json body = json::parse(res->body, nullptr, false);
  ASSERT_TRUE(body.is_object() && body.contains("error")) << res->body;
  const json& e = body["error"];
  EXPECT_TRUE(e["message"].is_string() && !e["message"].get<std::string>().empty()) << res->body;
  EXPECT_TRUE(e["type"].is_string()) << res->body;
  EXPECT_TRUE(e.contains("param") && e.contains("code")) << res->body;
  if (!param.empty()) {
    EXPECT_EQ(e["param"], param) << res->body;
  }
}

// vLLM's ignore_eos (nibble bench-serve sends it): the answer goes on past EOS to max_tokens.
// stories260K never samples its EOS, so the server's engine takes the answer's 6th token as one.
TEST(Serve, IgnoreEosGeneratesToMaxTokens) {
  REQUIRE_STORIES();
  const std::string prompt = "Once upon a time";
  std::vector<int32_t> ids;
  {
    cpu::CpuExecutor exec(*stories().model, {});
    Engine engine(exec, &stories().tok, {});
    Request r;
    r.prompt = stories().tok.encode(prompt, true);
    r.stop.max_tokens = 30;
    engine.submit(r, [&](const OutputEvent& ev) {
      if (ev.token.id >= 0) ids.push_back(ev.token.id);
    });
    engine.run();
  }
  ASSERT_EQ(ids.size(), 30u);
  const int32_t eos = ids[5];
  const size_t first_eos = size_t(std::find(ids.begin(), ids.end(), eos) - ids.begin());
  Served s(keyed(), {}, {.prefix_caching = false, .eos_ids = {eos}});
  const json body = {{"prompt", prompt}, {"max_tokens", 30}, {"temperature", 0}};
  auto res = s.post("/v1/completions", body);
  ASSERT_TRUE(res && res->status == 200) << (res ? res->body : "");
  EXPECT_EQ(json::parse(res->body)["usage"]["completion_tokens"], first_eos + 1);  // the EOS ends it
  json ignoring = body;
  ignoring["ignore_eos"] = true;
  res = s.post("/v1/completions", ignoring);
  ASSERT_TRUE(res && res->status == 200) << (res ? res->body : "");
  const json answer = json::parse(res->body);
  EXPECT_EQ(answer["usage"]["completion_tokens"], 30);
  EXPECT_EQ(answer["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(answer["choices"][0]["text"], direct_completion(prompt, 30).text);
  ignoring["ignore_eos"] = "yes";
  expect_error(s.post("/v1/completions", ignoring), 400, "ignore_eos");
}

TEST(Serve, ErrorsHaveOpenAIsShapeAndStatus) {
  REQUIRE_STORIES();
  ServerOptions opt = keyed();
  opt.max_body = 2048;
  Served s(opt);
  auto c = s.client();
  expect_error(c.Post("/v1/completions", "{\"prompt\": ", "application/json"), 400);
  expect_error(c.Post("/v1/completions", "[1, 2]", "application/json"), 400);
  expect_error(s.post("/v1/completions", {{"max_tokens", 4}}), 400, "prompt");
  expect_error(s.post("/v1/completions", {{"prompt", "Hi"}, {"max_tokens", "4"}}), 400, "max_tokens");
  expect_error(s.post("/v1/completions", {{"prompt", "Hi"}, {"temperature", "hot"}}), 400, "temperature");
  expect_error(s.post("/v1/completions", {{"prompt", "Hi"}, {"stop", json::array({1})}}), 400, "stop");
  expect_error(s.post("/v1/completions", {{"prompt", "Hi"}, {"max_tokens", 600}}), 400);  // past the 512 context
  expect_error(s.post("/v1/completions", {{"prompt", "Hi"}, {"n", 0}}), 400, "n");
  expect_error(s.post("/v1/completions", {{"prompt", "Hi"}, {"n", 129}}), 400, "n");
  expect_error(s.post("/v1/completions", {{"prompt", json::array({"a", "b"})}, {"n", 100}}), 400);  // 200 choices
  expect_error(s.post("/v1/completions", {{"prompt", json::array()}}), 400, "prompt");
  expect_error(s.post("/v1/completions", {{"prompt", json::array({1.5})}}), 400, "prompt");
  expect_error(s.post("/v1/completions", {{"prompt", json::array({1, "a"})}}), 400, "prompt");
  expect_error(s.post("/v1/completions", {{"prompt", json::array({100000})}}), 400);  // outside the vocabulary
  expect_error(s.post("/v1/completions", {{"prompt", "Hi"}, {"logprobs", 21}}), 400, "logprobs");
  // Parameters nibble does not use: a wrong type is a 400, a value that changes the answer too.
  expect_error(s.post("/v1/completions", {{"prompt", "Hi"}, {"user", 5}}), 400, "user");
  expect_error(s.post("/v1/completions", {{"prompt", "Hi"}, {"suffix", 3}}), 400, "suffix");
  expect_error(s.post("/v1/completions", {{"prompt", "Hi"}, {"best_of", "2"}}), 400, "best_of");
  expect_error(s.post("/v1/completions", {{"prompt", "Hi"}, {"best_of", 2}}), 400, "best_of");
  expect_error(s.post("/v1/completions", {{"prompt", "Hi"}, {"logit_bias", json::array()}}), 400, "logit_bias");
  expect_error(s.post("/v1/completions", {{"prompt", "Hi"}, {"logit_bias", {{"5", 10}}}}), 400, "logit_bias");
  const json hi = json::array({json{{"role", "user"}, {"content", "Hi"}}});
  expect_error(s.post("/v1/chat/completions", {{"messages", hi}, {"response_format", "json"}}), 400, "response_format");
  expect_error(s.post("/v1/chat/completions", {{"messages", hi}, {"response_format", {{"type", "json_object"}}}}), 400,
               "response_format");
  expect_error(s.post("/v1/chat/completions", {{"messages", hi}, {"tools", {{"type", "function"}}}}), 400, "tools");
  expect_error(s.post("/v1/chat/completions", {{"messages", hi}, {"store", "yes"}}), 400, "store");
  expect_error(s.post("/v1/chat/completions", {{"messages", hi}, {"top_logprobs", 30}, {"logprobs", true}}), 400,
               "top_logprobs");
  // ... and with the right type and no effect, accepted.
  EXPECT_EQ(s.post("/v1/chat/completions", {{"messages", hi},
                                            {"max_tokens", 2},
                                            {"user", "u1"},
                                            {"logit_bias", json::object()},
                                            {"response_format", {{"type", "text"}}},
                                            {"some_future_field", {1, 2}}})
                ->status,
            200);
  expect_error(s.post("/v1/chat/completions", {{"messages", json::array()}}), 400, "messages");
  expect_error(s.post("/v1/chat/completions", {{"messages", json::array({json{{"role", "robot"}, {"content", "x"}}})}}), 400);
  expect_error(s.post("/v1/completions", {{"model", "gpt-9"}, {"prompt", "Hi"}}), 404, "model");
  expect_error(c.Get("/v1/nothing"), 404);
  expect_error(c.Post("/v1/completions", json{{"prompt", std::string(4000, 'a')}}.dump(), "application/json"), 413);
  expect_error(s.post("/v1/completions", {{"prompt", "Hi"}}, nullptr), 401);
  expect_error(s.post("/v1/completions", {{"prompt", "Hi"}}, "wrong-key"), 401);
  expect_error(s.client(nullptr).Get("/v1/models"), 401);
  expect_error(s.client(nullptr).Get("/metrics"), 401);
  auto health = s.client(nullptr).Get("/health");
  ASSERT_TRUE(health);
  EXPECT_EQ(health->status, 200);
  auto models = c.Get("/v1/models");
  ASSERT_TRUE(models && models->status == 200);
  EXPECT_EQ(json::parse(models->body)["data"][0]["id"], "stories");
  // The server is fine after all of that.
  auto ok = s.post("/v1/completions", {{"prompt", "Hi"}, {"max_tokens", 3}, {"temperature", 0}});
  ASSERT_TRUE(ok);
  EXPECT_EQ(ok->status, 200) << ok->body;
}

TEST(Serve, AFullQueueAnswers429) {
  REQUIRE_STORIES();
  ServerOptions opt = keyed();
  opt.max_queue = 1;
  Served s(opt);
  int first_status = 0;
  {
    auto hold = s.server.hold_engine();  // the first request waits in the queue
    std::thread t([&] {
      auto res = s.post("/v1/completions", {{"prompt", "Hi"}, {"max_tokens", 3}, {"temperature", 0}});
      first_status = res ? res->status : -1;
    });
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (s.server.metrics().waiting == 0 && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    ASSERT_EQ(s.server.metrics().waiting, 1);
    expect_error(s.post("/v1/completions", {{"prompt", "Hi"}, {"max_tokens", 3}}), 429);
    hold.unlock();
    t.join();
  }
  EXPECT_EQ(first_status, 200);
  // Its place is free again.
  auto again = s.post("/v1/completions", {{"prompt", "Hi"}, {"max_tokens", 3}, {"temperature", 0}});
  ASSERT_TRUE(again);
  EXPECT_EQ(again->status, 200) << again->body;
}

TEST(Serve, AClientLeavingMidStreamAbortsItsRequestAndFreesItsPages) {
  REQUIRE_STORIES();
  Served s(keyed());
  constexpr int kMaxTokens = 400;
  auto c = s.client();
  httplib::Request req;
  req.method = "POST";
  req.path = "/v1/completions";
  req.body = json{{"prompt", "Once"}, {"max_tokens", kMaxTokens}, {"temperature", 0}, {"stream", true}}.dump();
  req.set_header("Content-Type", "application/json");
  req.set_header("Authorization", std::string("Bearer ") + kKey);
  std::unique_lock<std::mutex> hold;
  // On its first bytes the client stops the engine and leaves.
  req.content_receiver = [&](const char*, size_t, uint64_t, uint64_t) {
    hold = s.server.hold_engine();
    return false;
  };
  httplib::Response res;
  httplib::Error err;
  EXPECT_FALSE(c.send(req, res, err));
  c.stop();
  // The server notices (its keep-alive comments fail) while the engine still holds the request.
  const auto noticed_by = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (s.metric("nibble_client_disconnects_total") == 0 && std::chrono::steady_clock::now() < noticed_by)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  EXPECT_EQ(s.metric("nibble_client_disconnects_total"), 1);
  hold.unlock();
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while ((s.metric("nibble_requests_running") != 0 || s.metric("nibble_requests_waiting") != 0) &&
         std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  EXPECT_EQ(s.metric("nibble_requests_aborted_total"), 1);
  EXPECT_EQ(s.metric("nibble_requests_finished_total"), 0);
  EXPECT_LT(s.metric("nibble_generated_tokens_total"), kMaxTokens);
  EXPECT_TRUE(Served::wait_until([&] { return s.server.metrics().kv_pages_used == 0; }));
  // The server still answers.
  auto ok = s.post("/v1/completions", {{"prompt", "Hi"}, {"max_tokens", 3}, {"temperature", 0}});
  ASSERT_TRUE(ok);
  EXPECT_EQ(ok->status, 200);
}

// /metrics: the TTFT, TPOT and latency histograms count each engine request; the token counters
// add up; an unbounded CPU pool reports no free pages, a bounded one its own.
TEST(Serve, MetricsHaveLatencyHistogramsAndTokenCounts) {
  REQUIRE_STORIES();
  Served s(keyed());
  const std::string prompt = "Once upon a time";
  auto res = s.post("/v1/completions", {{"prompt", prompt}, {"max_tokens", 10}, {"temperature", 0}, {"n", 3}});
  ASSERT_TRUE(res && res->status == 200);
  auto text = s.client().Get("/metrics")->body;
  auto line = [&](const std::string& prefix) {
    const size_t at = text.find("\n" + prefix);
    EXPECT_NE(at, std::string::npos) << prefix << "\n" << text;
    return at == std::string::npos ? -1.0 : std::stod(text.substr(text.find(' ', at + prefix.size()) + 1));
  };
  for (const char* h : {"nibble_time_to_first_token_seconds", "nibble_time_per_output_token_seconds",
                        "nibble_request_latency_seconds"}) {
    SCOPED_TRACE(h);
    EXPECT_NE(text.find(fmt::format("# TYPE {} histogram", h)), std::string::npos);
    EXPECT_EQ(line(fmt::format("{}_count", h)), 3);  // one per choice
    EXPECT_EQ(line(fmt::format("{}_bucket{{le=\"+Inf\"}}", h)), 3);
    EXPECT_GT(line(fmt::format("{}_sum", h)), 0);
  }
  EXPECT_EQ(s.server.metrics().ttft.count(), 3);
  EXPECT_EQ(s.metric("nibble_generated_tokens_total"), 30);
  EXPECT_EQ(s.metric("nibble_prompt_tokens_total"), int64_t(3 * stories().tok.encode(prompt, true).size()));
  EXPECT_EQ(text.find("nibble_kv_pages_free"), std::string::npos) << "an unbounded pool has no free pages to count";
  RuntimeOptions bounded;
  bounded.kv_pages = 40;
  Served b(keyed(), bounded);
  EXPECT_EQ(b.metric("nibble_kv_pages_free"), 40);
}

// drain() (SIGTERM): a request mid-generation runs to its end and is answered in full; new ones
// get 503 meanwhile and /health says so; then the server stops.
TEST(Serve, DrainFinishesRunningRequestsAndRefusesNewOnes) {
  REQUIRE_STORIES();
  Served s(keyed());
  const std::string prompt = "Once upon a time";
  const Direct want = direct_completion(prompt, 200);
  std::vector<std::string> events;
  std::thread client([&] {
    events = s.stream("/v1/completions", {{"prompt", prompt}, {"max_tokens", 200}, {"temperature", 0}, {"stream", true}});
  });
  auto hold = s.hold_once_running();
  std::thread drainer([&] { s.server.drain(); });
  ASSERT_TRUE(Served::wait_until([&] { return s.client().Get("/health")->status == 503; }));
  expect_error(s.post("/v1/completions", {{"prompt", "Hi"}, {"max_tokens", 3}}), 503);
  hold.unlock();
  client.join();
  drainer.join();  // returns once the stream was answered
  const Streamed got = join_stream(events, false);
  EXPECT_EQ(got.text, want.text);
  EXPECT_EQ(got.finish, finish_reason_name(want.finish));
  EXPECT_EQ(s.server.metrics().aborted, 0);
  EXPECT_FALSE(s.client().Get("/health")) << "the server still listens after the drain";
}

// A non-streamed request whose client leaves is aborted, all its choices, and frees its pages.
TEST(Serve, ANonStreamedClientLeavingAbortsItsRequest) {
  REQUIRE_STORIES();
  Served s(keyed());
  constexpr int kN = 16, kMaxTokens = 480;  // long enough to be held mid-generation
  std::thread client([&] {
    auto c = s.client();
    httplib::Request req;
    req.method = "POST";
    req.path = "/v1/completions";
    req.body = json{{"prompt", "Once"}, {"max_tokens", kMaxTokens}, {"n", kN}}.dump();
    req.set_header("Content-Type", "application/json");
    req.set_header("Authorization", std::string("Bearer ") + kKey);
    req.content_receiver = [](const char*, size_t, uint64_t, uint64_t) { return false; };  // leaves on the first byte
    httplib::Response res;
    httplib::Error err;
    EXPECT_FALSE(c.send(req, res, err));
    c.stop();
  });
  auto hold = s.hold_once_running();
  client.join();
  EXPECT_TRUE(Served::wait_until([&] { return s.server.metrics().client_disconnects == 1; }));
  hold.unlock();
  EXPECT_TRUE(Served::wait_until([&] { return s.server.metrics().running == 0 && s.server.metrics().waiting == 0; }));
  EXPECT_EQ(s.metric("nibble_requests_aborted_total"), kN);
  EXPECT_EQ(s.metric("nibble_requests_finished_total"), 0);
  EXPECT_LT(s.metric("nibble_generated_tokens_total"), kN * kMaxTokens);
  EXPECT_TRUE(Served::wait_until([&] { return s.server.metrics().kv_pages_used == 0; }));
}

// Connections waiting for a handler thread count toward --max-queue: with both threads busy,
// the third request waits (room for 3), the fourth is answered 429 at once.
TEST(Serve, ConnectionsPastTheHandlerThreadsCountTowardTheQueue) {
  REQUIRE_STORIES();
  ServerOptions opt = keyed();
  opt.http_threads = 2;
  opt.max_queue = 3;
  Served s(opt);
  std::vector<int> status(3, 0);
  std::vector<std::thread> clients;
  {
    auto hold = s.server.hold_engine();
    for (int i = 0; i < 3; ++i) {
      clients.emplace_back([&, i] {
        auto res = s.post("/v1/completions", {{"prompt", "Hi"}, {"max_tokens", 3}, {"temperature", 0}});
        status[size_t(i)] = res ? res->status : -1;
      });
      // One at a time: the first two take the threads, the third waits for one.
      ASSERT_TRUE(Served::wait_until([&] {
        return s.server.metrics().waiting + s.server.metrics().queued_connections == i + 1;
      }));
    }
    // Settled: a connection is counted as queued until a free handler thread picks it up, so the
    // sum above can reach 3 while the second one is still on its way to its thread.
    EXPECT_TRUE(Served::wait_until([&] {
      return s.server.metrics().queued_connections == 1 && s.server.metrics().waiting == 2;
    })) << "queued " << s.server.metrics().queued_connections << ", waiting " << s.server.metrics().waiting;
    auto c = s.client();
    c.set_read_timeout(5);
    expect_error(c.Post("/v1/completions", json{{"prompt", "Hi"}, {"max_tokens", 3}}.dump(), "application/json"), 429);
  }
  for (auto& t : clients) t.join();
  EXPECT_EQ(status, std::vector<int>(3, 200));
}

// Prompts and answer lengths the load tests draw from, with each one's answer alone (greedy).
struct Workload {
  std::vector<std::string> prompts;
  std::vector<int> max_tokens;
  std::vector<Direct> want;
  explicit Workload(int n) {
    const char* subjects[] = {"The cat", "A big dog", "Lily", "Tom and Sue", "The sun", "A bird", "The tree", "Ben"};
    for (int i = 0; i < n; ++i) {
      prompts.push_back(fmt::format("{} {}", subjects[i % 8], std::string(size_t(i / 8), '!')));
      max_tokens.push_back(6 + i % 7);
      want.push_back(direct_completion(prompts.back(), max_tokens.back()));
    }
  }
  json body(size_t i, bool stream) const {
    return {{"prompt", prompts[i]}, {"max_tokens", max_tokens[i]}, {"temperature", 0}, {"stream", stream}};
  }
};

// 1,000 streams at once (a handler thread each): every one complete and well formed, each the
// same prompt's answer alone; the server answers afterwards and its pages are back to none.
TEST(Serve, AThousandConcurrentStreamsEachEqualTheirSerialAnswer) {
  REQUIRE_STORIES();
  constexpr int kClients = 1000;
  const Workload work(40);
  ServerOptions opt = keyed();
  opt.http_threads = kClients + 8;
  opt.max_queue = kClients;
  Served s(opt);
  std::vector<Streamed> got(kClients);
  std::vector<std::thread> clients;
  clients.reserve(kClients);
  for (int i = 0; i < kClients; ++i)
    clients.emplace_back([&, i] { got[size_t(i)] = join_stream(s.stream("/v1/completions", work.body(size_t(i) % 40, true)), false); });
  for (auto& t : clients) t.join();
  int wrong = 0;
  for (int i = 0; i < kClients; ++i) {
    const Direct& want = work.want[size_t(i) % 40];
    if (got[size_t(i)].text != want.text || got[size_t(i)].finish != finish_reason_name(want.finish)) {
      ADD_FAILURE() << "client " << i << ": '" << got[size_t(i)].text << "' (" << got[size_t(i)].finish << "), want '" << want.text << "'";
      if (++wrong == 5) break;
    }
  }
  EXPECT_EQ(s.server.metrics().finished, kClients);
  EXPECT_EQ(s.server.metrics().aborted, 0);
  auto ok = s.post("/v1/completions", work.body(0, false));
  ASSERT_TRUE(ok);
  EXPECT_EQ(ok->status, 200);
  EXPECT_TRUE(Served::wait_until([&] { return s.server.metrics().kv_pages_used == 0; }));
}

// Mixed clients for NIBBLE_SOAK_SECONDS (3 by default; the `soak` ctest runs 60): valid requests
// streamed and not, malformed JSON, bodies over --max-body, wrong keys, slow readers and clients
// that leave mid-stream. Each gets its status (valid answers equal to the answer alone); no
// request is lost: every one that reached the engine finished or was aborted; at the end nothing
// waits or runs and the KV pages are back to none.
// The process's resident memory in MB after glibc gives its free pages back (so that what stays is
// what is held, not what the allocator keeps for reuse).
double resident_mb() {
  malloc_trim(0);
  std::ifstream statm("/proc/self/statm");
  long pages = 0, resident = 0;
  statm >> pages >> resident;
  return double(resident) * double(sysconf(_SC_PAGESIZE)) / 1e6;
}

TEST(ServeSoak, MixedClientsGetTheirStatusAndNothingIsLost) {
  REQUIRE_STORIES();
  const char* env = std::getenv("NIBBLE_SOAK_SECONDS");
  const int seconds = env ? std::atoi(env) : 3;
  const uint64_t seed = 20261203;
  std::printf("soak: %d s, seed %llu\n", seconds, static_cast<unsigned long long>(seed));
  const Workload work(16);
  ServerOptions opt = keyed();
  opt.max_body = 4096;
  Served s(opt);
  enum Kind { Whole, Streamed_, Malformed, Oversized, WrongKey, SlowReader, Leaves, kKinds };
  std::atomic<int64_t> sent[kKinds] = {}, engine_requests{0};
  // Idle memory: the server up and one answer given (its threads and the engine's buffers exist).
  ASSERT_EQ(s.post("/v1/completions", work.body(0, false))->status, 200);
  ++engine_requests;
  const double idle_mb = resident_mb();
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(seconds);
  std::vector<std::thread> clients;
  for (int c = 0; c < 12; ++c)
    clients.emplace_back([&, c] {
      std::mt19937_64 rng(seed + uint64_t(c));
      while (std::chrono::steady_clock::now() < deadline && !::testing::Test::HasFailure()) {
        const auto kind = Kind(rng() % kKinds);
        const size_t p = rng() % work.prompts.size();
        ++sent[kind];
        switch (kind) {
          case Whole: {
            auto res = s.post("/v1/completions", work.body(p, false));
            ++engine_requests;
            ASSERT_TRUE(res) << "a lost request";
            ASSERT_EQ(res->status, 200) << res->body;
            EXPECT_EQ(json::parse(res->body)["choices"][0]["text"], work.want[p].text);
            break;
          }
          case Streamed_:
          case SlowReader:
          case Leaves: {
            auto cl = s.client();
            httplib::Request req;
            req.method = "POST";
            req.path = "/v1/completions";
            req.body = work.body(p, true).dump();
            req.set_header("Content-Type", "application/json");
            req.set_header("Authorization", std::string("Bearer ") + kKey);
            std::string raw;
            req.content_receiver = [&](const char* data, size_t n, uint64_t, uint64_t) {
              raw.append(data, n);
              if (kind == SlowReader) std::this_thread::sleep_for(std::chrono::milliseconds(20));
              return kind != Leaves;
            };
            httplib::Response res;
            httplib::Error err;
            ++engine_requests;
            const bool answered = cl.send(req, res, err);
            if (kind == Leaves) break;
            ASSERT_TRUE(answered) << "a lost stream: " << httplib::to_string(err);
            ASSERT_EQ(res.status, 200);
            ASSERT_GE(raw.size(), 14u);
            EXPECT_EQ(raw.substr(raw.size() - 14), "data: [DONE]\n\n");
            std::string text;
            for (size_t at = 0; (at = raw.find("data: {", at)) != std::string::npos; at += 6)
              text += json::parse(raw.substr(at + 6, raw.find("\n\n", at) - at - 6))["choices"][0]["text"].get<std::string>();
            EXPECT_EQ(text, work.want[p].text);
            break;
          }
          case Malformed: {
            auto res = s.client().Post("/v1/completions", R"({"prompt": "Hi", "max_tokens": )", "application/json");
            ASSERT_TRUE(res);
            EXPECT_EQ(res->status, 400);
            break;
          }
          case Oversized: {
            auto res = s.client().Post("/v1/completions", json{{"prompt", std::string(5000, 'a')}}.dump(), "application/json");
            ASSERT_TRUE(res);
            EXPECT_EQ(res->status, 413);
            break;
          }
          case WrongKey: {
            auto res = s.post("/v1/completions", work.body(p, false), "wrong");
            ASSERT_TRUE(res);
            EXPECT_EQ(res->status, 401);
            break;
          }
          case kKinds: break;
        }
      }
    });
  for (auto& t : clients) t.join();
  for (int k = 0; k < kKinds; ++k) EXPECT_GT(sent[k], 0) << "kind " << k << " never sent";
  // Every request that reached the engine ended: finished, or aborted because its client left.
  EXPECT_TRUE(Served::wait_until([&] {
    const ServerMetrics& m = s.server.metrics();
    return m.finished + m.aborted == engine_requests && m.waiting == 0 && m.running == 0 && m.kv_pages_used == 0;
  })) << "finished " << s.server.metrics().finished << " + aborted " << s.server.metrics().aborted << " of "
      << engine_requests;
  EXPECT_LE(s.server.metrics().aborted, sent[Leaves]);
  // Memory back to its idle level: a request's state that outlives it (a leak per request, a
  // queue that keeps ended entries) grows with the thousands of requests a soak sends.
  const double end_mb = resident_mb();
  std::printf("soak: resident %.1f MB idle, %.1f MB after %lld requests\n", idle_mb, end_mb,
              static_cast<long long>(engine_requests.load()));
  EXPECT_LE(end_mb, idle_mb + 64) << "memory did not come back to its idle level";
  auto ok = s.post("/v1/completions", work.body(0, false));
  ASSERT_TRUE(ok);
  EXPECT_EQ(ok->status, 200);
}

// The four formats' text, as their Hugging Face templates write it.
TEST(ChatTemplate, RendersTheFourFormats) {
  const std::vector<ChatMessage> m = {{"system", "S"}, {"user", "U1"}, {"assistant", "A1"}, {"user", "U2"}};
  EXPECT_EQ(ChatTemplate::named("llama-2").render(m),
            "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nU1 [/INST] A1 </s><s>[INST] U2 [/INST]");
  EXPECT_EQ(ChatTemplate::named("mistral").render(m), "<s>[INST] S\n\nU1 [/INST]A1</s>[INST] U2 [/INST]");
  EXPECT_EQ(ChatTemplate::named("llama-3").render(m),
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nU1<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nA1<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nU2<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n");
  EXPECT_EQ(ChatTemplate::named("chatml").render(m),
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
            "<|im_start|>user\nU2<|im_end|>\n<|im_start|>assistant\n");
  EXPECT_THROW(ChatTemplate::named("vicuna"), Error);
  EXPECT_THROW(ChatTemplate::named("chatml").render({{"robot", "x"}}), Error);
}

// The real templates (tokenizer_config.json under $NIBBLE_DATA/tokenizers; Llama-2's and Mistral's
// there have none, so theirs are Hugging Face's published ones) given as --chat-template FILE, both
// as the template's text and as the whole tokenizer_config.json; each renders what Jinja renders
// for them (the strings below came from jinja2 3.1 with Hugging Face's settings).
TEST(ChatTemplate, TemplateFilesAreRecognisedAndRenderAsJinjaDoes) {
  const auto dir = std::filesystem::temp_directory_path() / fmt::format("nibble_chat_file_{}", ::getpid());
  std::filesystem::create_directories(dir);
  auto write = [&](const std::string& name, const std::string& text) {
    std::ofstream(dir / name) << text;
    return (dir / name).string();
  };
  const std::vector<ChatMessage> m = {{"system", "S"}, {"user", " U1 "}, {"assistant", "A1"}, {"user", "U2"}};
  const std::string llama2 =
      "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
      "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
      "{% for message in loop_messages %}{% if loop.index0 == 0 and system_message != false %}{% set content = "
      "'<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = "
      "message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + "
      "' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
      "{% endfor %}";
  const std::string mistral =
      "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] "
      "+ ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% endif %}{% endfor %}";
  const ChatTemplate l2 = ChatTemplate::from_option(write("llama2.jinja", llama2));
  EXPECT_EQ(l2.format, ChatFormat::Llama2);
  EXPECT_EQ(l2.render(m), "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\n U1 [/INST] A1 </s><s>[INST] U2 [/INST]");
  EXPECT_EQ(ChatTemplate::from_option(write("mistral.jinja", mistral)).render({{"user", "U1"}, {"assistant", "A1"}, {"user", "U2"}}),
            "<s>[INST] U1 [/INST]A1</s>[INST] U2 [/INST]");
  if (std::filesystem::exists(test::data_dir() / "tokenizers/llama3/tokenizer_config.json")) {
    for (const char* name : {"llama3", "qwen3"}) {
      const auto config = test::data_dir() / "tokenizers" / name / "tokenizer_config.json";
      std::ifstream in(config);
      const json j = json::parse(in);
      const ChatTemplate from_json = ChatTemplate::from_option(config.string());
      const ChatTemplate from_text = ChatTemplate::from_option(write(std::string(name) + ".jinja", j["chat_template"]));
      EXPECT_EQ(from_json.format, from_text.format) << name;
      EXPECT_EQ(from_json.render(m), std::string(name) == "llama3"
                                         ? "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
                                           "<|start_header_id|>user<|end_header_id|>\n\nU1<|eot_id|>"
                                           "<|start_header_id|>assistant<|end_header_id|>\n\nA1<|eot_id|>"
                                           "<|start_header_id|>user<|end_header_id|>\n\nU2<|eot_id|>"
                                           "<|start_header_id|>assistant<|end_header_id|>\n\n"
                                         : "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n U1 <|im_end|>\n"
                                           "<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nU2<|im_end|>\n"
                                           "<|im_start|>assistant\n")
          << name;
    }
  }
  // A named template takes the model's BOS/EOS text.
  ChatTemplate named = ChatTemplate::named("mistral");
  named.use_tokens_of("<B>", "<E>");
  EXPECT_EQ(named.render({{"user", "U"}, {"assistant", "A"}, {"user", "V"}}), "<B>[INST] U [/INST]A<E>[INST] V [/INST]");
  // Turns that do not alternate are refused, as these templates raise_exception.
  EXPECT_THROW(l2.render({{"user", "U"}, {"user", "V"}}), Error);
  EXPECT_THROW(ChatTemplate::from_option(write("vicuna.jinja", "{{ '### Human: ' + m.content }}")), Error);
  EXPECT_THROW(ChatTemplate::from_option(write("none.json", R"({"bos_token": "<s>"})")), Error);
  EXPECT_THROW(ChatTemplate::from_option((dir / "missing.jinja").string()), Error);  // neither a file nor a name
  std::filesystem::remove_all(dir);
}

// A model's tokenizer_config.json chat_template: recognised by its markers, refused when unknown.
TEST(ChatTemplate, RecognisesAModelsTemplateOrRefusesIt) {
  const auto dir = std::filesystem::temp_directory_path() / fmt::format("nibble_chat_{}", ::getpid());
  std::filesystem::create_directories(dir);
  auto with = [&](const json& config) {
    std::ofstream(dir / "tokenizer_config.json") << config.dump();
    return ChatTemplate::from_model(dir);
  };
  EXPECT_FALSE(with({{"bos_token", "<s>"}}).has_value());
  EXPECT_EQ(with({{"chat_template", "{% for m in messages %}<|im_start|>{{ m.role }}..."}})->format, ChatFormat::ChatML);
  EXPECT_EQ(with({{"chat_template", "{{ '<|start_header_id|>' + m.role }}"}})->format, ChatFormat::Llama3);
  EXPECT_EQ(with({{"chat_template", "{{ bos_token + '[INST] <<SYS>>\\n' }}"}})->format, ChatFormat::Llama2);
  const auto mistral = with({{"chat_template", "{{ bos_token }}{{ '[INST] ' + m['content'] + ' [/INST]' }}"},
                             {"bos_token", {{"content", "<B>"}}},
                             {"eos_token", "<E>"}});
  EXPECT_EQ(mistral->format, ChatFormat::Mistral);
  EXPECT_EQ(mistral->render({{"user", "U"}}), "<B>[INST] U [/INST]");
  EXPECT_EQ(with({{"chat_template", json::array({{{"name", "default"}, {"template", "<|im_start|>"}}})}})->format,
            ChatFormat::ChatML);
  EXPECT_THROW(with({{"chat_template", "{{ '### Human: ' + m.content }}"}}), Error);
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace nibble::server
