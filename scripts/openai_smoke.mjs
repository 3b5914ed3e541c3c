// The official `openai` npm client against `nibble serve` (stories260K): completions and chat,
// streamed and not, usage, stop, seed and n. Run by scripts/openai_smoke.sh, which installs the
// package and starts the server; argv[2] is the server's base URL.
import assert from 'node:assert/strict';
import OpenAI from 'openai';

const client = new OpenAI({ baseURL: `${process.argv[2]}/v1`, apiKey: 'smoke-key', maxRetries: 0, timeout: 30000 });
const model = 'stories260K';
const prompt = 'Once upon a time';

const models = await client.models.list();
assert.deepEqual(models.data.map((m) => m.id), [model]);

// Completions: the stream's text is the answer's; usage adds up.
const done = await client.completions.create({ model, prompt, max_tokens: 24, temperature: 0 });
assert.equal(done.choices[0].finish_reason, 'length');
assert.equal(done.usage.completion_tokens, 24);
assert.equal(done.usage.total_tokens, done.usage.prompt_tokens + 24);
let text = '';
let usage = null;
const stream = await client.completions.create({
  model, prompt, max_tokens: 24, temperature: 0, stream: true, stream_options: { include_usage: true },
});
for await (const chunk of stream) {
  if (chunk.usage) usage = chunk.usage;
  for (const c of chunk.choices) text += c.text;
}
assert.equal(text, done.choices[0].text);
assert.deepEqual(usage, done.usage);

// stop: the answer ends before the stop string, which never shows.
const stop = done.choices[0].text.slice(8, 12);
const stopped = await client.completions.create({ model, prompt, max_tokens: 24, temperature: 0, stop: [stop] });
assert.equal(stopped.choices[0].finish_reason, 'stop');
assert.equal(stopped.choices[0].text, done.choices[0].text.slice(0, done.choices[0].text.indexOf(stop)));

// seed: the same seed samples the same text.
const sample = () => client.completions.create({ model, prompt, max_tokens: 24, temperature: 0.9, seed: 7 });
assert.equal((await sample()).choices[0].text, (await sample()).choices[0].text);

// n choices: choice i samples with seed + i, so choice 1 of seed 7 is choice 0 of seed 8.
const two = await client.completions.create({ model, prompt, max_tokens: 24, temperature: 0.9, seed: 7, n: 2 });
assert.deepEqual(two.choices.map((c) => c.index), [0, 1]);
assert.equal(two.choices[0].text, (await sample()).choices[0].text);
const next = await client.completions.create({ model, prompt, max_tokens: 24, temperature: 0.9, seed: 8 });
assert.equal(two.choices[1].text, next.choices[0].text);

// Chat, streamed and not.
const messages = [{ role: 'user', content: 'Tell me a story about a cat.' }];
const chat = await client.chat.completions.create({ model, messages, max_tokens: 20, temperature: 0 });
assert.equal(chat.choices[0].message.role, 'assistant');
assert.ok(chat.usage.prompt_tokens > 0);
let chatText = '';
const chatStream = await client.chat.completions.create({ model, messages, max_tokens: 20, temperature: 0, stream: true });
for await (const chunk of chatStream) chatText += chunk.choices[0]?.delta?.content ?? '';
assert.equal(chatText, chat.choices[0].message.content);

// A wrong key: the client's own authentication error.
const wrong = new OpenAI({ baseURL: `${process.argv[2]}/v1`, apiKey: 'wrong', maxRetries: 0 });
await assert.rejects(wrong.models.list(), (e) => e.status === 401);

console.log('openai smoke: completions, chat, streams, usage, stop, seed, n and 401 as the official client sees them');
