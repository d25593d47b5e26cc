//! HTML rendering: escaping, the page frame, and the generic table the page's script
//! re-renders from the JSON twin (same column spec on both sides, so the first paint and
//! every refresh show the same cells).

use serde::Serialize;
use serde_json::Value;

/// Escapes text for HTML content and attribute values.
#[must_use]
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes one URL path segment or query value.
#[must_use]
pub fn enc(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

/// How a cell shows its value (the script has the same formats).
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fmt {
    /// Text (`-` for null).
    Text,
    /// A count.
    Num,
    /// A rate per second, one decimal.
    Rate,
    /// An array of strings, comma-separated.
    List,
    /// Subscribers: `target (pending N, dead M)`.
    Subs,
    /// An object of counts: `k: v, ...`.
    Counts,
    /// Any JSON, compact, cut at 200 characters.
    Json,
    /// A status's result or error.
    Outcome,
    /// `in / total`.
    Parts,
    /// A replay-one button (a POST form with the CSRF token) for the row's `task_id`.
    Replay,
}

/// One column of a generic table.
#[derive(Debug, Clone, Serialize)]
pub struct Col {
    /// The row field (dotted path).
    pub k: &'static str,
    /// The header.
    pub h: &'static str,
    /// The format.
    pub f: Fmt,
    /// A link template: `{field}` is replaced by the row's field, percent-encoded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub link: Option<&'static str>,
}

/// A column shorthand.
#[must_use]
pub const fn col(k: &'static str, h: &'static str, f: Fmt) -> Col {
    Col {
        k,
        h,
        f,
        link: None,
    }
}

/// A linked column shorthand.
#[must_use]
pub const fn link(k: &'static str, h: &'static str, template: &'static str) -> Col {
    Col {
        k,
        h,
        f: Fmt::Text,
        link: Some(template),
    }
}

/// `v` at a dotted path (`""`: `v` itself).
#[must_use]
pub fn at<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    if path.is_empty() {
        return Some(v);
    }
    path.split('.').try_fold(v, |v, k| v.get(k))
}

fn num(v: &Value) -> String {
    match v {
        Value::Null => String::from("-"),
        Value::Number(n) => n.to_string(),
        other => text(other),
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => String::from("-"),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn cut(s: String, max: usize) -> String {
    if s.chars().count() <= max {
        return s;
    }
    let mut out: String = s.chars().take(max - 1).collect();
    out.push('…');
    out
}

/// A cell's text, for every format but [`Fmt::Replay`]. (Mirrors `fmt` in app.js.)
#[must_use]
pub fn cell_text(f: Fmt, v: &Value, row: &Value) -> String {
    match f {
        Fmt::Text | Fmt::Replay => text(v),
        Fmt::Num => num(v),
        Fmt::Rate => match v.as_f64() {
            Some(r) => format!("{r:.1}"),
            None => String::from("-"),
        },
        Fmt::List => match v.as_array() {
            Some(a) => a.iter().map(text).collect::<Vec<_>>().join(", "),
            None => text(v),
        },
        Fmt::Subs => match v.as_array() {
            Some(a) if !a.is_empty() => a
                .iter()
                .map(|s| {
                    format!(
                        "{} (pending {}, dead {})",
                        text(s.get("target").unwrap_or(&Value::Null)),
                        num(s.get("pending").unwrap_or(&Value::Null)),
                        num(s.get("dead").unwrap_or(&Value::Null))
                    )
                })
                .collect::<Vec<_>>()
                .join("; "),
            _ => String::from("(no subscribers)"),
        },
        Fmt::Counts => match v.as_object() {
            Some(o) => o
                .iter()
                .map(|(k, v)| format!("{k}: {}", num(v)))
                .collect::<Vec<_>>()
                .join(", "),
            None => text(v),
        },
        Fmt::Json => cut(
            match v {
                Value::Null => String::from("-"),
                other => other.to_string(),
            },
            200,
        ),
        Fmt::Outcome => {
            if let Some(r) = row.get("result").filter(|r| !r.is_null()) {
                cut(r.to_string(), 200)
            } else if let Some(e) = row.get("error").filter(|e| !e.is_null()) {
                cut(
                    format!(
                        "{}: {}",
                        text(e.get("kind").unwrap_or(&Value::Null)),
                        text(e.get("message").unwrap_or(&Value::Null))
                    ),
                    200,
                )
            } else {
                String::from("-")
            }
        }
        Fmt::Parts => format!(
            "{} / {}",
            num(row.get("parts_in").unwrap_or(&Value::Null)),
            match row.get("parts_total") {
                Some(Value::Number(n)) => n.to_string(),
                _ => String::from("?"),
            }
        ),
    }
}

fn fill(template: &str, row: &Value) -> String {
    let mut out = String::new();
    let mut rest = template;
    while let Some(i) = rest.find('{') {
        out.push_str(&rest[..i]);
        let Some(j) = rest[i..].find('}') else {
            break;
        };
        let key = &rest[i + 1..i + j];
        out.push_str(&enc(&text(at(row, key).unwrap_or(&Value::Null))));
        rest = &rest[i + j + 1..];
    }
    out.push_str(rest);
    out
}

/// The page's context a table may need (the replay form's action and token).
#[derive(Debug, Clone, Default)]
pub struct Ctx {
    /// The CSRF token.
    pub csrf: String,
    /// The service of a service page.
    pub svc: Option<String>,
}

fn replay_form(ctx: &Ctx, id: &str) -> String {
    let svc = ctx.svc.as_deref().unwrap_or_default();
    format!(
        "<form method=\"post\" action=\"/api/services/{}/replay\" class=\"inline\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{}\">\
         <input type=\"hidden\" name=\"id\" value=\"{}\">\
         <button type=\"submit\" class=\"replay\" data-task=\"{}\">Replay</button></form>",
        enc(svc),
        esc(&ctx.csrf),
        esc(id),
        esc(id)
    )
}

/// A table of the rows at `path` of `data`; the script re-renders it from the JSON twin.
#[must_use]
pub fn table(id: &str, data: &Value, path: &str, cols: &[Col], ctx: &Ctx, empty: &str) -> String {
    let spec = serde_json::to_string(cols).unwrap_or_default();
    // The rows as the script will see them: it re-renders only when they changed (so a
    // refresh does not replace a button under the user's pointer).
    let sig = at(data, path)
        .map(|v| serde_json::to_string(v).unwrap_or_default())
        .unwrap_or_default();
    let mut out = format!(
        "<table id=\"{}\" data-path=\"{}\" data-cols=\"{}\" data-empty=\"{}\" data-sig=\"{}\"><thead><tr>",
        esc(id),
        esc(path),
        esc(&spec),
        esc(empty),
        esc(&sig)
    );
    for c in cols {
        out.push_str(&format!("<th>{}</th>", esc(c.h)));
    }
    out.push_str("</tr></thead><tbody>");
    let rows = at(data, path).and_then(Value::as_array);
    match rows {
        Some(rows) if !rows.is_empty() => {
            for row in rows {
                out.push_str("<tr>");
                for c in cols {
                    let v = at(row, c.k).unwrap_or(&Value::Null);
                    let inner = match (c.f, c.link) {
                        (Fmt::Replay, _) => match v.as_str() {
                            Some(id) => replay_form(ctx, id),
                            None => String::from("-"),
                        },
                        (f, Some(t)) => format!(
                            "<a href=\"{}\">{}</a>",
                            esc(&fill(t, row)),
                            esc(&cell_text(f, v, row))
                        ),
                        (f, None) => esc(&cell_text(f, v, row)),
                    };
                    out.push_str(&format!("<td>{inner}</td>"));
                }
                out.push_str("</tr>");
            }
        }
        _ => out.push_str(&format!(
            "<tr><td colspan=\"{}\" class=\"empty\">{}</td></tr>",
            cols.len(),
            esc(empty)
        )),
    }
    out.push_str("</tbody></table>");
    out
}

/// A value the script keeps up to date (`data-path` into the JSON twin).
#[must_use]
pub fn value(data: &Value, path: &str, f: Fmt) -> String {
    // `<array>.length`, as in the script.
    let len = path.strip_suffix(".length").and_then(|p| {
        at(data, p)
            .and_then(Value::as_array)
            .map(|a| Value::from(a.len()))
    });
    let v = len
        .as_ref()
        .or_else(|| at(data, path))
        .unwrap_or(&Value::Null);
    format!(
        "<span data-path=\"{}\" data-f=\"{}\">{}</span>",
        esc(path),
        esc(&serde_json::to_value(f)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()),
        esc(&cell_text(f, v, data))
    )
}

/// Notes (what a view could not show).
#[must_use]
pub fn notes(data: &Value) -> String {
    let Some(list) = data.get("notes").and_then(Value::as_array) else {
        return String::new();
    };
    if list.is_empty() {
        return String::new();
    }
    let mut out = String::from("<ul class=\"notes\">");
    for n in list {
        out.push_str(&format!("<li>{}</li>", esc(&text(n))));
    }
    out.push_str("</ul>");
    out
}

/// Which navigation entry is active.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    /// Overview.
    Overview,
    /// Topics.
    Topics,
    /// Jobs.
    Jobs,
    /// Tasks.
    Tasks,
    /// None of them (a service page).
    None,
}

/// The whole page: head, navigation, `<main>` bound to its JSON twin.
#[must_use]
pub fn page(title: &str, nav: Nav, api: Option<(&str, u32)>, csrf: &str, body: &str) -> String {
    let item = |n: Nav, href: &str, label: &str| {
        format!(
            "<a href=\"{href}\"{}>{label}</a>",
            if n == nav { " class=\"active\"" } else { "" }
        )
    };
    let main_attrs = match api {
        Some((u, secs)) => format!(" data-api=\"{}\" data-refresh=\"{secs}\"", esc(u)),
        None => String::new(),
    };
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <meta name=\"csrf-token\" content=\"{csrf}\">\
         <title>{title} · warren</title>\
         <link rel=\"icon\" href=\"data:,\">\
         <link rel=\"stylesheet\" href=\"/static/app.css\">\
         <script src=\"/static/app.js\" defer></script></head>\
         <body><header><span class=\"brand\">warren</span><nav>{}{}{}{}</nav>\
         <span id=\"live\" class=\"live\"></span></header>\
         <main{main_attrs}>{body}</main></body></html>\n",
        item(Nav::Overview, "/", "Overview"),
        item(Nav::Topics, "/topics", "Topics"),
        item(Nav::Jobs, "/jobs", "Jobs"),
        item(Nav::Tasks, "/tasks", "Tasks"),
        csrf = esc(csrf),
        title = esc(title),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn escapes() {
        assert_eq!(
            esc("<a href=\"x\">'&"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;"
        );
        assert_eq!(enc("a b/c"), "a%20b%2Fc");
    }

    #[test]
    fn tables_render_rows_links_and_empties() {
        let data = json!({"services": [{"name": "a<b", "ready": 3, "rate": 1.25}], "none": []});
        let cols = [
            link("name", "Service", "/services/{name}"),
            col("ready", "Ready", Fmt::Num),
            col("rate", "Rate", Fmt::Rate),
        ];
        let t = table(
            "s",
            &data,
            "services",
            &cols,
            &Ctx::default(),
            "no services",
        );
        assert!(t.contains("<a href=\"/services/a%3Cb\">a&lt;b</a>"), "{t}");
        assert!(t.contains("<td>3</td><td>1.2</td>") || t.contains("<td>3</td><td>1.3</td>"));
        let e = table("n", &data, "none", &cols, &Ctx::default(), "no services");
        assert!(e.contains("no services"));
    }

    #[test]
    fn formats() {
        let row = json!({"parts_in": 2, "parts_total": null, "error": {"kind": "handler", "message": "boom"}});
        assert_eq!(cell_text(Fmt::Parts, &Value::Null, &row), "2 / ?");
        assert_eq!(cell_text(Fmt::Outcome, &Value::Null, &row), "handler: boom");
        assert_eq!(
            cell_text(
                Fmt::Subs,
                &json!([{"target": "s.m", "pending": 1, "dead": 0}]),
                &row
            ),
            "s.m (pending 1, dead 0)"
        );
        assert_eq!(
            cell_text(Fmt::Counts, &json!({"handler": 2}), &row),
            "handler: 2"
        );
    }
}
