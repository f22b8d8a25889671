// Shared by every dashboard page: fetch the JSON API, build tables and plots with DOM calls
// (text is always set as text, never as HTML), show errors as a person would want them.
"use strict";

async function api(path, options) {
  const response = await fetch(path, options);
  const body = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function fmt(value) {
  if (value === null || value === undefined) return "–";
  if (typeof value === "number") return Number.isInteger(value) ? String(value) : value.toPrecision(4);
  return String(value);
}

function link(href, text) { return el("a", { href }, text); }
function param(name) { return new URLSearchParams(location.search).get(name); }
function short(id) { return id ? id.slice(-8) : "–"; }

// columns: [label, row => value or node, "num" for numbers]
function table(columns, rows, attrs) {
  const head = el("tr", {}, columns.map(([label]) => el("th", {}, label)));
  const body = rows.map((row) => el("tr", {}, columns.map(([, get, cls]) => {
    const value = get(row);
    return el("td", cls ? { class: cls } : {}, value instanceof Node || Array.isArray(value) ? value : fmt(value));
  })));
  return el("table", attrs || {}, el("thead", {}, head), el("tbody", {}, body));
}

function plot(kind, query, alt) {
  const src = `/api/plots/${kind}.svg?${new URLSearchParams(query)}`;
  return el("img", { src, alt, "data-plot": kind, title: `the same picture as: nirslake plot ${kind} ... -o ${kind}.svg` });
}

function showError(error) {
  document.querySelector("main").append(el("div", { class: "error" }, String(error.message || error)));
}

async function frame(title) {
  document.title = `nirslake · ${title}`;
  const header = el("header", {},
    link("/", "Runs"), link("/leaderboard.html", "Leaderboard"), link("/openapi.json", "API schema"),
    el("span", { class: "workspace", id: "workspace" }));
  document.body.prepend(header);
  try {
    const info = await api("/api/info");
    document.getElementById("workspace").textContent =
      `${info.workspace} · ${info.read_only ? "read-only" : "deleting runs allowed"}`;
    return info;
  } catch (error) { showError(error); return {}; }
}
