"""Labels: Japanese first (the seeds' words), English per user preference.

Templates write the Japanese label and pass it through ``t``; this table gives its English.
A label missing here shows in Japanese in both languages (a unit test keeps the screens'
labels in the table).
"""

from __future__ import annotations

from collections.abc import Callable

LANGS = ("ja", "en")

EN: dict[str, str] = {
    "Tayori コンソール": "Tayori console",
    "ログイン": "Log in",
    "ログアウト": "Log out",
    "ユーザー名またはメールアドレス": "Username or email",
    "パスワード": "Password",
    "ユーザー名かパスワードが違います。": "Wrong username or password.",
    "ログインの失敗が続いたため、しばらくお待ちください。": (
        "Too many failed logins: please wait a while."
    ),
    "ホーム": "Home",
    "顧客検索": "Contacts",
    "顧客詳細": "Contact",
    "配信リスト": "Lists",
    "インポート": "Import",
    "ジョブ確認": "Jobs",
    "CSV出力": "CSV export",
    "キャンペーン": "Campaigns",
    "ステップメール": "Step mail",
    "バウンス": "Bounces",
    "準備中": "Coming soon",
    "この画面は準備中です。": "This screen is not ready yet.",
    "言語": "Language",
    "メニュー": "Menu",
    "本文へ移動": "Skip to content",
    # home
    "今日": "Today",
    "過去7日間": "Last 7 days",
    "配信数": "Sent",
    "エラー": "Errors",
    "バウンス数": "Bounces",
    "配信停止": "Unsubscribed",
    "実行中のジョブ": "Running jobs",
    "配信中のキャンペーン": "Campaigns sending",
    "開封": "Opens",
    "クリック": "Clicks",
    "苦情": "Complaints",
    "取得できません": "unavailable",
    "このAPIはまだありません": "no API for this yet",
    "最近のジョブ": "Recent jobs",
    "最近のキャンペーン": "Recent campaigns",
    # contacts
    "検索": "Search",
    "条件をクリア": "Clear",
    "キーワード": "Keyword",
    "メール・氏名・会社名": "email, name, company",
    "タグ（含む）": "Tags (include)",
    "タグ（除く）": "Tags (exclude)",
    "いずれか": "any",
    "すべて": "all",
    "カンマ区切り": "comma-separated",
    "グループ": "Group",
    "配信状態": "Delivery state",
    "指定なし": "any",
    "全てで配信可能": "deliverable everywhere",
    "いずれかで配信停止": "unsubscribed somewhere",
    "いずれかで配信禁止": "banned somewhere",
    "配信可能": "Deliverable",
    "配信禁止": "Banned",
    "メンバー": "member",
    "メンバーでない": "not a member",
    "配信ステータス": "Delivery status",
    "営業ステータス": "Sales status",
    "スター": "Star",
    "あり": "yes",
    "なし": "no",
    "スコア": "Score",
    "以上": "min",
    "以下": "max",
    "登録日": "Created",
    "から": "from",
    "まで": "to",
    "履歴": "History",
    "受信": "received",
    "日以内": "days",
    "条件の追加": "More conditions",
    "項目": "Field",
    "条件": "Condition",
    "値": "Value",
    "並び順": "Sort",
    "昇順": "ascending",
    "降順": "descending",
    "保存した条件": "Saved searches",
    "この条件を保存": "Save this search",
    "条件名": "Name",
    "共通": "global",
    "保存": "Save",
    "呼び出す": "Load",
    "件": "contacts",
    "該当": "Found",
    "次のページ": "Next page",
    "最初のページ": "First page",
    "メールアドレス": "Email",
    "氏名": "Name",
    "会社名": "Company",
    "タグ": "Tags",
    "一括操作": "Bulk action",
    "タグを追加": "Add tag",
    "タグを削除": "Remove tag",
    "スターを付ける": "Star",
    "スターを外す": "Unstar",
    "グループに追加": "Join group",
    "削除": "Delete",
    "選択した顧客": "Selected contacts",
    "条件に一致するすべての顧客": "All matching contacts",
    "実行": "Apply",
    "確認": "Confirm",
    "次の操作を実行します。よろしいですか？": "This will be applied. Continue?",
    "対象": "Contacts",
    "キャンセル": "Cancel",
    "完了しました": "Done",
    "該当する顧客はいません。": "No contacts match.",
    "閲覧のみ": "read only",
    # contact
    "プロフィール": "Profile",
    "カスタム項目": "Custom fields",
    "グループごとの配信状態": "Delivery state per group",
    "配信停止日時": "Changed at",
    "方法": "Method",
    "変更": "Change",
    "配信状態を変更しました": "Delivery state changed",
    "バウンス履歴": "Bounce history",
    "キャンペーン受信履歴": "Campaigns received",
    "受信日時": "Received",
    "キャンペーン数": "campaigns",
    "連続ソフトバウンス": "Soft bounces in a row",
    "最初へ": "First page",
    "次へ": "Next",
    "分類": "Classification",
    "日時": "Time",
    "参加日時": "Joined",
    "どのグループにも参加していません。": "Not a member of any group.",
    "記録はありません。": "Nothing recorded.",
    # groups / jobs / imports / export
    "グループ名": "Name",
    "ステッププラン": "Step plans",
    "メンバー数": "Members",
    "配信状態の同期設定": "Delivery state sync",
    "配信停止の同期": "Sync unsubscribes",
    "配信禁止の同期": "Sync bans",
    "ブラックリスト": "Blacklist",
    "種類": "Kind",
    "状態": "Status",
    "進捗": "Progress",
    "作成日時": "Created",
    "依頼者": "Requested by",
    "ダウンロード": "Download",
    "ファイル": "File",
    "文字コード": "Encoding",
    "自動判定": "auto",
    "登録モード": "Mode",
    "新規追加と更新": "insert or update",
    "更新のみ": "update only",
    "新規のみ": "insert only",
    "更新キー": "Key",
    "アップロード": "Upload",
    "プレビュー": "Preview",
    "取り込む": "Import",
    "列": "Column",
    "取り込まない": "skip",
    "行エラー": "Row errors",
    "行": "Line",
    "理由": "Reason",
    "エラーをCSVでダウンロード": "Download errors as CSV",
    "出力項目": "Columns",
    "見出し行": "Header row",
    "出力する": "include",
    "出力": "Export",
    "ジョブはありません。": "No jobs.",
    # bulk delivery state (顧客検索)
    "配信停止にする": "Unsubscribe in a group",
    "配信禁止にする": "Ban in a group",
    "配信可能にする": "Make deliverable in a group",
    "グループのメンバー": "Members of the group",
    "変更される件数": "Memberships that change",
    "すでにこの配信状態": "already in this state",
    "配信状態の変更について": "About changing the delivery state",
    "グループのメンバーだけが変更されます。メンバーでない顧客はそのままです。": (
        "Only members of the group change; other contacts are left as they are."
    ),
    "オペレーターの変更（方法: システム）として、実行したユーザーとともに記録されます。": (
        "The change is recorded as an operator's (method: system), with the user who made it."
    ),
    "配信禁止は配信停止より強い停止です。解除できるのはオペレーターだけです。": (
        "A ban is stronger than an unsubscribe: only an operator can lift it."
    ),
    "配信可能に戻すと、停止・禁止だった顧客にも再び配信されます。同意を確認してください。": (
        "Making memberships deliverable mails unsubscribed and banned contacts again:"
        " check that they agreed."
    ),
    "配信状態の同期設定がオンなら、配信停止・配信禁止は他のグループにも反映されます。": (
        "With the sync policy on, an unsubscribe or ban also applies to the contact's other groups."
    ),
    "変更は配信停止サービスが数秒以内に反映します。": (
        "The suppression service applies the change within seconds."
    ),
    # campaign (キャンペーン詳細) and its complaint guard
    "キャンペーン詳細": "Campaign",
    "配信日時": "Scheduled at",
    "件名": "Subject",
    "配信予定数": "Planned",
    "成功数": "Delivered",
    "エラー数": "Errors",
    "配信停止で除外": "Suppressed",
    "結果待ち": "Awaiting results",
    "未配信数": "Not sent",
    "送信待ち (ドメインの速度制限)": "Waiting (held for domain rate limits)",
    "受信ドメインの速度制限に合わせて送信を待っている宛先があります。"
    "順に送信され、すべての結果が出るまで配信中のままです。": (
        "Some recipients' mail waits for their receiving domain's rate limit: it goes out"
        " in turn, and the campaign stays sending until every result is in."
    ),
    "苦情率ガード": "Complaint guard",
    "苦情率がしきい値を超えたため、次のドメインへの残りの配信を保留しています。"
    "再開するまで送信されません。": (
        "The complaint rate passed the threshold: the remaining mail to these domains is held"
        " and is not sent until it is resumed."
    ),
    "配信保留中のドメイン": "Held domains",
    "配信保留中": "held",
    "保留中の宛先": "Held recipients",
    "苦情率": "Complaint rate",
    "配信成功": "delivered",
    "判定日時": "Decided at",
    "再開したドメイン": "Resumed domains",
    "再開": "Resume",
    "すべて再開": "Resume all",
    "すべてのドメイン": "every domain",
    "配信を再開しました": "Sending resumed",
    "配信を中止しました": "Sending given up",
    "配信中止": "Give up",
    "配信中止したドメイン": "Given-up domains",
    "このドメインへの残りの配信を中止しますか？保留中の宛先には送信せず、配信停止で除外として数えます。"
    "キャンペーンは完了できるようになります。": (
        "Give up the remaining mail to this domain? Its held recipients are not sent to and"
        " count as suppressed; the campaign can then finish."
    ),
    "このドメインへの配信を再開しますか？"
    "苦情率が高いままの場合、送信者の評価が下がるおそれがあります。": (
        "Resume sending to this domain? If complaints stay high, the sender's reputation may"
        " suffer."
    ),
    "保留中のすべてのドメインへの配信を再開しますか？": "Resume sending to every held domain?",
    # errors
    "ページが見つかりません": "Page not found",
    "サービスに接続できません": "A service cannot be reached",
    "しばらくしてからもう一度お試しください。": "Please try again in a moment.",
    "この操作は許可されていません": "You may not do this",
    "フォームの有効期限が切れました。ページを開き直してください。": (
        "This form has expired: open the page again."
    ),
    "エラーが発生しました": "Something went wrong",
    "入力内容を確認してください。": "Please check what you entered.",
}


def translator(lang: str) -> Callable[[str], str]:
    """``t(label)``: the label in ``lang``."""
    if lang == "en":
        return lambda text: EN.get(text, text)
    return lambda text: text
