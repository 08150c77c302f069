"use strict";
// Markdown -> HTML built from ESCAPED text: the model's text is escaped before any rule runs, so
// every tag in the result is one written here. Model text never becomes markup.
(function () {
  const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

  function escapeHtml(s) {
    return s.replace(/[&<>"']/g, (c) => ESCAPES[c]);
  }

  // Inline rules on one escaped line: `code` spans first, kept out of the emphasis rules.
  function inline(escaped) {
    return escaped
      .split(/(`[^`]+`)/g)
      .map((part, i) =>
        i % 2
          ? "<code>" + part.slice(1, -1) + "</code>"
          : part
              .replace(/\*\*([^*]+)\*\*/g, "<strong>$1</strong>")
              .replace(/(^|[^*\w])\*([^*\s][^*]*)\*/g, "$1<em>$2</em>")
      )
      .join("");
  }

  // Paragraphs, headings and lists of escaped text without code fences.
  function blocks(escaped) {
    const out = [];
    let para = [];
    let list = null;
    const flushPara = () => {
      if (para.length) out.push("<p>" + para.map(inline).join("<br>") + "</p>");
      para = [];
    };
    const flushList = () => {
      if (list) {
        const items = list.items.map((x) => "<li>" + inline(x) + "</li>").join("");
        out.push(`<${list.tag}>${items}</${list.tag}>`);
      }
      list = null;
    };
    for (const line of escaped.split("\n")) {
      const heading = line.match(/^(#{1,6})\s+(.*)$/);
      const bullet = line.match(/^\s*[-*+]\s+(.*)$/);
      const numbered = line.match(/^\s*\d+[.)]\s+(.*)$/);
      if (!line.trim()) {
        flushPara();
        flushList();
      } else if (heading) {
        flushPara();
        flushList();
        const level = Math.min(heading[1].length + 2, 6);
        out.push(`<h${level}>${inline(heading[2])}</h${level}>`);
      } else if (bullet || numbered) {
        flushPara();
        const tag = bullet ? "ul" : "ol";
        if (!list || list.tag !== tag) {
          flushList();
          list = { tag, items: [] };
        }
        list.items.push((bullet || numbered)[1]);
      } else {
        flushList();
        para.push(line);
      }
    }
    flushPara();
    flushList();
    return out.join("");
  }

  // The whole answer: ``` fences become <pre><code>; an unclosed fence (mid-stream) is code too.
  function renderMarkdown(text) {
    const out = [];
    let prose = [];
    let code = null;
    for (const line of text.split("\n")) {
      const fence = line.match(/^\s*```\s*([\w+#.-]*)/);
      if (fence && code === null) {
        out.push(blocks(escapeHtml(prose.join("\n"))));
        prose = [];
        code = { lang: fence[1], lines: [] };
      } else if (fence) {
        out.push(codeBlock(code));
        code = null;
      } else if (code !== null) {
        code.lines.push(line);
      } else {
        prose.push(line);
      }
    }
    out.push(blocks(escapeHtml(prose.join("\n"))));
    if (code !== null) out.push(codeBlock(code));
    return out.join("");
  }

  function codeBlock(code) {
    const label = code.lang ? `<div class="lang">${escapeHtml(code.lang)}</div>` : "";
    return `<pre>${label}<code>${escapeHtml(code.lines.join("\n"))}</code></pre>`;
  }

  window.renderMarkdown = renderMarkdown;
  window.escapeHtml = escapeHtml;
})();
