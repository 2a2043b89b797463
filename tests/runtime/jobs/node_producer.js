// A producer in another language: sends one job straight to Redis (the documented
// Dramatiq layout, RESP over a plain socket, no packages) and one over the HTTP API.
//
//   node node_producer.js REDIS_HOST REDIS_PORT NAMESPACE API_URL TOKEN QUEUE ACTOR
//
// Prints {"redis_job_id": ..., "http": {...}} on success; exits 1 on any error.
"use strict";
const net = require("net");
const crypto = require("crypto");

const [host, port, namespace, apiUrl, token, queue, actor] = process.argv.slice(2);

function encode(args) {
  let out = `*${args.length}\r\n`;
  for (const arg of args) {
    const text = String(arg);
    out += `$${Buffer.byteLength(text)}\r\n${text}\r\n`;
  }
  return out;
}

// Reads one RESP reply (simple string, error, integer, bulk string) from a buffer.
function parse(buffer) {
  const end = buffer.indexOf("\r\n");
  if (end < 0) return null;
  const kind = String.fromCharCode(buffer[0]);
  const line = buffer.slice(1, end).toString();
  if (kind === "+" || kind === ":") return { value: line, rest: buffer.slice(end + 2) };
  if (kind === "-") throw new Error(`redis: ${line}`);
  if (kind === "$") {
    const size = Number(line);
    if (size < 0) return { value: null, rest: buffer.slice(end + 2) };
    if (buffer.length < end + 2 + size + 2) return null;
    return { value: buffer.slice(end + 2, end + 2 + size).toString(),
             rest: buffer.slice(end + 2 + size + 2) };
  }
  throw new Error(`unexpected reply type ${kind}`);
}

function redisCommands(commands) {
  return new Promise((resolve, reject) => {
    const socket = net.createConnection({ host, port: Number(port) });
    let buffer = Buffer.alloc(0);
    const replies = [];
    socket.on("connect", () => socket.write(commands.map(encode).join("")));
    socket.on("data", (chunk) => {
      buffer = Buffer.concat([buffer, chunk]);
      try {
        for (let reply = parse(buffer); reply; reply = parse(buffer)) {
          replies.push(reply.value);
          buffer = reply.rest;
        }
      } catch (err) {
        socket.destroy();
        reject(err);
        return;
      }
      if (replies.length === commands.length) {
        socket.end();
        resolve(replies);
      }
    });
    socket.on("error", reject);
  });
}

async function main() {
  const ns = `${namespace}-jobs`;
  const redisMessageId = crypto.randomUUID();
  const message = {
    queue_name: queue, actor_name: actor, args: ["from-node-redis"], kwargs: {},
    options: { redis_message_id: redisMessageId },
    message_id: crypto.randomUUID(), message_timestamp: Date.now(),
  };
  await redisCommands([
    ["HSET", `${ns}:${queue}.msgs`, redisMessageId, JSON.stringify(message)],
    ["RPUSH", `${ns}:${queue}`, redisMessageId],
    ["LPUSH", `${ns}:${queue}.wake`, "1"],
  ]);
  const response = await fetch(`${apiUrl}/api/v1/jobs`, {
    method: "POST",
    headers: { "Content-Type": "application/json", Authorization: `Bearer ${token}` },
    body: JSON.stringify({ queue, actor, args: ["from-node-http"],
                           options: { job_id: "node-http-1", priority: 5 } }),
  });
  const body = await response.json();
  if (response.status !== 201) throw new Error(`HTTP ${response.status}: ${JSON.stringify(body)}`);
  console.log(JSON.stringify({ redis_job_id: message.message_id, http: body }));
}

main().catch((err) => {
  console.error(err.stack || String(err));
  process.exit(1);
});
