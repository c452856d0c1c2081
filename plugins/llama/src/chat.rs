//! Renders chat messages with a model's Jinja chat template, the way Hugging Face's
//! `apply_chat_template` does (trim_blocks, lstrip_blocks, Python string methods).

use minijinja::{Environment, Error as JinjaError, ErrorKind, context};
use searchloop_core::{ChatMessage, Role};
use serde::Serialize;

use crate::error::{LlamaError, Result};

/// The name the template is registered under in its environment.
const TEMPLATE_NAME: &str = "chat";

/// A compiled chat template with the special-token texts it may refer to.
pub struct ChatTemplate {
    environment: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct TemplateMessage<'a> {
    role: &'a str,
    content: &'a str,
}

impl ChatTemplate {
    /// Compiles `source`; `bos_token` and `eos_token` are the texts the template sees under
    /// those names (empty when the model has none).
    pub fn new(
        source: String,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self> {
        let mut environment = Environment::new();
        // Hugging Face renders chat templates with jinja2's trim_blocks and lstrip_blocks on,
        // and templates call Python string methods such as `.strip()`.
        environment.set_trim_blocks(true);
        environment.set_lstrip_blocks(true);
        environment
            .set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        environment.add_function("raise_exception", raise_exception);
        environment
            .add_template_owned(TEMPLATE_NAME, source)
            .map_err(|e| LlamaError::ChatTemplate(format!("the template does not compile: {e}")))?;
        Ok(Self {
            environment,
            bos_token: bos_token.unwrap_or_default(),
            eos_token: eos_token.unwrap_or_default(),
        })
    }

    /// Renders `messages`; with `add_generation_prompt` the text ends where the assistant's
    /// reply begins.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let template = self
            .environment
            .get_template(TEMPLATE_NAME)
            .map_err(|e| LlamaError::ChatTemplate(e.to_string()))?;
        let messages: Vec<TemplateMessage<'_>> = messages
            .iter()
            .map(|m| TemplateMessage {
                role: role_name(m.role),
                content: &m.content,
            })
            .collect();
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
            })
            .map_err(|e| LlamaError::ChatTemplate(format!("rendering failed: {e}")))
    }
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::System => "system",
        Role::User => "user",
        Role::Assistant => "assistant",
    }
}

/// Templates call `raise_exception(msg)` to refuse a conversation they cannot render (for
/// example two user turns in a row).
fn raise_exception(message: String) -> std::result::Result<String, JinjaError> {
    Err(JinjaError::new(ErrorKind::InvalidOperation, message))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] | trim + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn chatml_renders_like_hugging_face() {
        let template = ChatTemplate::new(CHATML.into(), None, Some("<|im_end|>".into())).unwrap();
        let messages = [ChatMessage::new(Role::User, "  Where is Paris? ")];
        assert_eq!(
            template.render(&messages, true).unwrap(),
            "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nWhere is Paris?<|im_end|>\n<|im_start|>assistant\n"
        );
        assert!(
            !template
                .render(&messages, false)
                .unwrap()
                .ends_with("assistant\n")
        );
    }

    #[test]
    fn python_methods_and_special_tokens_are_available() {
        let template = ChatTemplate::new(
            "{{ bos_token }}{% for m in messages %}{{ m.content.strip().upper() }}{% endfor %}{{ eos_token }}"
                .into(),
            Some("<s>".into()),
            Some("</s>".into()),
        )
        .unwrap();
        let messages = [ChatMessage::new(Role::User, " hi ")];
        assert_eq!(template.render(&messages, false).unwrap(), "<s>HI</s>");
    }

    #[test]
    fn template_errors_are_reported_not_panicked() {
        assert!(ChatTemplate::new("{% for %}".into(), None, None).is_err());
        let refusing = ChatTemplate::new(
            "{{ raise_exception('only one message allowed') }}".into(),
            None,
            None,
        )
        .unwrap();
        let err = refusing.render(&[], true).unwrap_err().to_string();
        assert!(err.contains("only one message allowed"), "{err}");
    }
}
