// Chat templates: renderings of hand-written templates (Jinja's whitespace rules, loops,
// namespaces, undefined values, filters), raise_exception, the refusal messages of unsupported
// constructs, the caps on untrusted templates, and tokenizer_config.json loading.
#include <gtest/gtest.h>

#include <fstream>
#include <string>
#include <vector>

#include "tests/common/temp_dir.h"
#include "trainer/data/chat_template.h"
#include "trainer/errors.h"

namespace strata {
namespace {

using testing::TempDir;

const std::vector<ChatMessage> kChat = {
    {"system", "Be brief."}, {"user", "Hi there"}, {"assistant", "Hello!"}, {"user", "Bye"}};

std::string render(const std::string& source, const std::vector<ChatMessage>& messages = kChat,
                   bool generation_prompt = false) {
  ChatTemplateOptions options;
  options.bos_token = "<s>";
  options.eos_token = "</s>";
  options.add_generation_prompt = generation_prompt;
  return ChatTemplate(source, "").render(messages, options);
}

// The DataError of parsing (or, with `render_too`, of rendering) a template.
std::string error_of(const std::string& source, bool render_too = false) {
  try {
    const ChatTemplate t(source, "t.jinja");
    if (render_too) {
      ChatTemplateOptions options;
      t.render(kChat, options);
    }
  } catch (const DataError& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected a DataError for: " << source;
  return "";
}

TEST(ChatTemplate, RendersChatML) {
  const std::string chatml =
      "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
      "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
      "{{ '<|im_start|>assistant\\n' }}{% endif %}";
  EXPECT_EQ(render(chatml, {{"user", "Hi"}}, false), "<|im_start|>user\nHi<|im_end|>\n");
  EXPECT_EQ(render(chatml, {{"user", "Hi"}}, true),
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
}

TEST(ChatTemplate, TrimBlocksAndLstripBlocks) {
  // A block tag's newline goes (trim_blocks), indentation before a block tag goes
  // (lstrip_blocks), an expression's newline stays, one trailing newline of the file goes.
  const std::string t =
      "{% for m in messages %}\n"
      "    {% if m.role == 'user' %}\n"
      "  U: {{ m.content }}\n"
      "    {% endif %}\n"
      "{% endfor %}\n"
      "end\n";
  EXPECT_EQ(render(t), "  U: Hi there\n  U: Bye\nend");
  // Comments are trimmed like blocks; \r\n is a newline.
  EXPECT_EQ(render("a\r\n  {# note #}\r\nb"), "a\nb");
}

TEST(ChatTemplate, WhitespaceControlMarkers) {
  EXPECT_EQ(render("a  \n {{- 'b' -}} \n c"), "abc");
  EXPECT_EQ(render("a\n  {%- if true -%}\n  b\n  {%- endif %}\nc"), "abc");
  // `+` keeps the indentation before a block and the newline after it.
  EXPECT_EQ(render("  {%+ if true %}x{% endif +%}\ny"), "  x\ny");
  // lstrip_blocks does not apply to expressions.
  EXPECT_EQ(render("a\n  {{ 'b' }}\n"), "a\n  b");
}

TEST(ChatTemplate, LoopVariablesSlicesAndNamespace) {
  EXPECT_EQ(render("{% for m in messages[1:] %}{{ loop.index }}{{ loop.index0 }}"
                   "{{ loop.first }}{{ loop.last }}{{ loop.length }};{% endfor %}"),
            "10TrueFalse3;21FalseFalse3;32FalseTrue3;");
  EXPECT_EQ(render("{% for m in messages if m.role != 'system' %}{{ loop.index }}{{ m.role[0] }}"
                   "{% if loop.index0 % 2 == 1 %}|{% endif %}{% endfor %}"),
            "1u2a|3u");
  EXPECT_EQ(render("{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + "
                   "m.content | length %}{% set local = 1 %}{% endfor %}{{ ns.n }}{{ local }}"),
            "26");
  EXPECT_EQ(render("{{ messages[-1].content }}{{ 'héllo'[1:3] }}{{ messages[::-2] | length }}"),
            "Byeél2");
  EXPECT_EQ(render("{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
                   "{% if m.role == 'system' %}{% continue %}{% endif %}{{ m.role }}{% endfor %}"),
            "user");
}

TEST(ChatTemplate, ExpressionsFiltersAndTests) {
  EXPECT_EQ(render("{{ 'a' ~ 1 ~ none ~ true ~ undefined_name }}"), "a1NoneTrue");
  EXPECT_EQ(render("{{ '  x \\n' | trim }}|{{ 'Ab' | upper }}{{ 'Ab' | lower }}"
                   "{{ 'hELLO wORLD' | capitalize }}"),
            "x|ABabHello world");
  EXPECT_EQ(render("{{ ' \\u3000x\\u00a0'.strip() }}|{{ 'abc'.startswith('ab') }}"
                   "{{ 'abc'.endswith('b') }}"),
            "x|TrueFalse");
  EXPECT_EQ(render("{{ missing is defined }}{{ none is none }}{{ 'a' is string }}"
                   "{{ 1 is string }}{{ messages[0] is mapping }}{{ 3 is not divisibleby 2 }}"),
            "FalseTrueTrueFalseTrueTrue");
  EXPECT_EQ(render("{{ 'ss' in 'class' }}{{ 'x' not in ['x'] }}{{ 'role' in messages[0] }}"
                   "{{ 1 < 2 < 3 }}{{ 'b' >= 'a' }}{{ -7 % 3 }}{{ -7 // 2 }}"),
            "TrueFalseTrueTrueTrue2-4");
  EXPECT_EQ(render("{{ 'y' if messages else 'n' }}{{ 'z' if not messages }}|{{ messages[9] }}"
                   "{{ missing | default('d') }}{{ [1, 'a', none] }}"),
            "y|d[1, 'a', None]");
  EXPECT_EQ(render("{{ messages | selectattr('role', 'equalto', 'user') | list | length }}"
                   "{{ ['a', 'b'] | join(', ') }}{{ {'k': [1, true, none, 'é\"']} | tojson }}"),
            "2a, b{\"k\": [1, true, null, \"é\\\"\"]}");
  EXPECT_EQ(render("{{ {'a': 1} | tojson(indent=2) }}"), "{\n  \"a\": 1\n}");
  EXPECT_EQ(render("{{ bos_token }}{{ eos_token }}{{ tools }}"), "<s></s>None");
}

TEST(ChatTemplate, UndefinedValues) {
  // Printing and testing an undefined value is fine; using it is an error.
  EXPECT_EQ(render("[{{ nope }}][{{ messages[0].nope }}][{{ nope | length }}]"
                   "{% for x in nope %}x{% else %}empty{% endfor %}"),
            "[][][0]empty");
  EXPECT_EQ(error_of("{{ nope.attr }}", true),
            "chat template t.jinja line 1:9: 'nope' is undefined");
  EXPECT_EQ(error_of("\n{{ nope + 'x' }}", true),
            "chat template t.jinja line 2:9: 'nope' is undefined");
  EXPECT_EQ(error_of("{{ 'a' + 1 }}", true),
            "chat template t.jinja line 1:8: unsupported operand types for +: string and int");
}

TEST(ChatTemplate, RaiseException) {
  const std::string t =
      "{% for m in messages %}\n"
      "{% if m.role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}\n"
      "{% endfor %}";
  EXPECT_EQ(error_of(t, true),
            "chat template t.jinja line 2:31: raise_exception: System role not supported");
  EXPECT_EQ(render(t, {{"user", "x"}}), "");
}

TEST(ChatTemplate, RefusesUnsupportedConstructs) {
  EXPECT_EQ(error_of("ab\n  {{ x | map('upper') }}"),
            "chat template t.jinja line 2:10: the filter 'map' is not supported (supported: "
            "capitalize, count, d, default, first, items, join, last, length, list, lower, reject, "
            "rejectattr, replace, reverse, select, selectattr, string, tojson, trim, upper)");
  EXPECT_EQ(error_of("{% macro f() %}x{% endmacro %}"),
            "chat template t.jinja line 1:4: the statement 'macro' is not supported (supported: "
            "if, elif, else, for, set, break, continue, generation)");
  EXPECT_EQ(error_of("{% include 'other.jinja' %}"),
            "chat template t.jinja line 1:4: the statement 'include' is not supported (supported: "
            "if, elif, else, for, set, break, continue, generation)");
  EXPECT_EQ(error_of("{{ strftime_now('%d %b %Y') }}"),
            "chat template t.jinja line 1:4: the function 'strftime_now' is not supported "
            "(supported: raise_exception, namespace)");
  EXPECT_EQ(error_of("{{ 'a{}'.format(1) }}"),
            "chat template t.jinja line 1:10: the method 'format' is not supported (supported: "
            "endswith, get, items, keys, lower, lstrip, replace, rstrip, split, startswith, strip, "
            "upper, values)");
  EXPECT_EQ(error_of("{% if x is callable %}{% endif %}"),
            "chat template t.jinja line 1:12: the test 'callable' is not supported (supported: "
            "!=, ==, boolean, defined, divisibleby, eq, equalto, even, false, integer, iterable, "
            "mapping, ne, none, number, odd, sequence, string, true, undefined)");
  EXPECT_EQ(error_of("{{ 1 / 2 }}"),
            "chat template t.jinja line 1:6: the operator '/' (true division) is not supported; "
            "use '//'");
  EXPECT_EQ(error_of("{{ 1.5 }}"),
            "chat template t.jinja line 1:4: floating-point numbers are not supported");
  EXPECT_EQ(error_of("{% raw %}x{% endraw %}"),
            "chat template t.jinja line 1:4: the statement 'raw' is not supported (supported: if, "
            "elif, else, for, set, break, continue, generation)");
  EXPECT_EQ(error_of("{% set x %}y{% endset %}"),
            "chat template t.jinja line 1:4: block assignments ({% set x %}...{% endset %}) are "
            "not supported");
  EXPECT_EQ(error_of("{% for m in messages %}\n{{ m }}"),
            "chat template t.jinja line 2:1: the template ends inside a block (missing "
            "{% endfor %})");
  EXPECT_EQ(error_of("{{ messages "),
            "chat template t.jinja line 1:13: the expression is not "
            "closed (missing }})");
  EXPECT_EQ(error_of("{# open"),
            "chat template t.jinja line 1:1: the comment is not closed "
            "(missing #})");
  EXPECT_EQ(error_of("{% endif %}"), "chat template t.jinja line 1:4: unexpected 'endif'");
}

TEST(ChatTemplate, CapsOnUntrustedTemplates) {
  // Deep nesting is refused, not a stack overflow.
  std::string deep = "{{ " + std::string(5000, '(') + "1" + std::string(5000, ')') + " }}";
  EXPECT_NE(error_of(deep).find("nested too deeply"), std::string::npos);
  std::string blocks;
  for (int k = 0; k < 500; ++k) blocks += "{% if true %}";
  EXPECT_NE(error_of(blocks).find("nested deeper than 100"), std::string::npos);
  // Output and string growth are capped.
  EXPECT_NE(error_of("{{ 'x' * 100000000 }}", true).find("exceeds the size limit"),
            std::string::npos);
  const std::string doubling =
      "{% set ns = namespace(s='xxxxxxxxxxxxxxxx') %}{% for a in messages %}{% for b in messages %}"
      "{% for c in messages %}{% set ns.s = ns.s + ns.s %}{% endfor %}{% endfor %}{% endfor %}"
      "{{ ns.s | length }}";
  EXPECT_NE(error_of(doubling, true).find("exceeds 64 MiB"), std::string::npos);
}

TEST(ChatTemplate, LoadsTokenizerConfig) {
  TempDir dir;
  {
    std::ofstream f(dir / "tokenizer_config.json");
    f << R"({"bos_token": {"content": "<|b|>", "special": true}, "eos_token": "<|e|>",
             "chat_template": [{"name": "tool_use", "template": "T"},
                               {"name": "default", "template": "{{ bos_token }}D"}]})";
  }
  const ChatTemplateSource s = load_chat_template(dir.path().string());
  EXPECT_EQ(s.source, "{{ bos_token }}D");
  EXPECT_EQ(s.bos_token, "<|b|>");
  EXPECT_EQ(s.eos_token, "<|e|>");
  EXPECT_EQ(s.origin, dir / "tokenizer_config.json");
  {
    std::ofstream f(dir / "tokenizer_config.json");
    f << R"({"chat_template": [{"name": "tool_use", "template": "T"}]})";
  }
  try {
    load_chat_template(dir / "tokenizer_config.json");
    ADD_FAILURE() << "expected a DataError";
  } catch (const DataError& e) {
    EXPECT_EQ(std::string(e.what()), (dir / "tokenizer_config.json") +
                                         " has no chat_template named \"default\" (it has: "
                                         "tool_use)");
  }
  {
    std::ofstream f(dir / "tokenizer_config.json");
    f << R"({"bos_token": "<s>"})";
  }
  EXPECT_THROW(load_chat_template(dir.path().string()), DataError);
}

TEST(ChatTemplate, ParsesMessages) {
  const auto m = parse_chat_messages(R"({"messages": [{"role": "user", "content": "é\n"}]})", "x");
  ASSERT_EQ(m.size(), 1u);
  EXPECT_EQ(m[0].role, "user");
  EXPECT_EQ(m[0].content, "é\n");
  try {
    parse_chat_messages(R"([{"role": "user", "content": 3}])", "x.json");
    ADD_FAILURE() << "expected a DataError";
  } catch (const DataError& e) {
    EXPECT_EQ(std::string(e.what()),
              "x.json: message 0 must be an object with string \"role\" and \"content\"");
  }
}

}  // namespace
}  // namespace strata
